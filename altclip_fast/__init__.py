"""altclip-fast: fast AltCLIP inference with fused Triton kernels, in parity with transformers.

Layers, each depending only on those below it::

    apps            runtime, embedding pipeline, search, serve, cli, benchmark
    optimize        the in-place patch of a transformers model
    modeling        config, checkpoint, weights, layers, model, outputs
    preprocessing   tokenizer, image processor, processor
    ops             the ops interface; torch and Triton backends; layouts
    kernels         Triton kernels: pure functions on tensors, no AltCLIP knowledge

``reference`` is the plain PyTorch oracle the tests compare against; nothing on the library's runtime
path imports it.

Public names are imported on first use, so ``import altclip_fast`` pulls in neither torch nor Triton.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "AltCLIPConfig": "modeling.config",
    "AltCLIPTextConfig": "modeling.config",
    "AltCLIPVisionConfig": "modeling.config",
    "AltCLIPError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "UsageError": "errors",
    "AltCLIPModel": "modeling.model",
    "AltCLIPTextModel": "modeling.model",
    "AltCLIPVisionModel": "modeling.model",
    "optimize": "optimize",
    "AltCLIPProcessor": "preprocessing.processor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
