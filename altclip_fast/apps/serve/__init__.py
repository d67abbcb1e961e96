"""``altclip-fast serve``: an OpenAI-compatible embedding server (Starlette under uvicorn).

One job per module:

- ``options``: every setting once (default, ``--help``, minimum, flag); generates the argparse flags.
- ``schemas``: the JSON body under its byte limit, request fields, ``ApiError``.
- ``images``: base64 / ``data:`` URI images, their formats, their pixel, side and aspect limits, and the
  request's pixel budget.
- ``model``: ``ServedModel`` (tokenize, run a batch, probe).
- ``tokens``: ``TextTokens``, a tokenizer per prep thread; long texts cut before tokenizing, with the
  ids of tokenizing them whole; token arrays wrapped and truncated alike.
- ``batching``: the dynamic batcher (pure asyncio).
- ``metrics``, ``label_cache``, ``health``, ``auth``: Prometheus metrics, classification label rows,
  ``/health``'s probe, the bearer-key middleware.
- ``hosts``: the Host check without a key (DNS rebinding); ``connections``: uvicorn's protocol with
  idle, header and body timeouts and a connection cap, and quiet client disconnects.
- ``collections``: the ``--collection`` folders opened for search (``search.Index``), global row ids;
  ``knn``: the search routes (clip-retrieval's ``/knn-service``, ``/metadata``, ``/indices-list`` and
  ``/v1/search``); ``search_batching``: concurrent searches of an index gathered into one product;
  ``faiss_index``: a collection's optional faiss index (``--faiss``, the ``[index]`` extra).
- ``app``: ``create_app`` and the routes; ``server``: ``run`` (bind, load, probe, uvicorn, signals).

Zero-shot classification is ``altclip_fast.apps.zeroshot``, shared with the CLI's ``classify``. The web
stack is the ``[serve]`` extra, imported only when an app is made or run; without it, ``altclip-fast
serve`` says how to install it, and the other commands never import it.
"""

from .app import create_app
from .batching import Batcher, BatchFailed, QueueFull
from .model import ServedModel
from .options import ServeOptions, add_arguments
from .schemas import ApiError
from .server import check_serve_dependencies, run

__all__ = ["ApiError", "Batcher", "BatchFailed", "QueueFull", "ServeOptions", "ServedModel", "add_arguments",
           "check_serve_dependencies", "create_app", "run"]
