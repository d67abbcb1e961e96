"""The ``altclip-fast`` command line: ``classify``, ``embed`` and ``bench``.

Every mistake a user can make (a missing path, a model directory without weights, a hub id without
network, no labels, an empty folder, an output that exists) ends in one ``altclip-fast: error: ...``
line and a non-zero exit: 2 for a wrong command line or input, 1 for a failure while running.
The arguments and inputs are checked before the model is loaded, so these errors come back fast
(those that need no model directory before torch is even imported).

``embed`` lives in altclip_fast.apps.embedding; ``altclip-fast bench`` is the end-to-end benchmark
(altclip_fast.apps.benchmark, also ``python -m altclip_fast.apps.benchmark``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import AltCLIPError, UsageError
from .runtime import DEFAULT_MODEL, DTYPE_CHOICES, Session


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line ("... error: ...; see --help"), not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------- classify


def _label_texts(labels: list[str], template: str | None) -> list[str]:
    from . import zeroshot

    try:
        return zeroshot.label_texts(labels, template)
    except zeroshot.TemplateError as exc:
        raise UsageError(f"--template {exc}") from None


def cmd_classify(args) -> int:
    labels = [label for label in (args.labels or []) if label.strip()]
    if not labels:
        raise UsageError("no labels: pass --labels with at least one label, e.g. --labels cat dog")
    texts = _label_texts(labels, args.template)
    for image in args.images:
        if not Path(image).exists():
            raise UsageError(f"{image}: no such file")
        if Path(image).is_dir():
            raise UsageError(f"{image} is a directory: classify takes image files (embed takes folders)")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")

    import torch

    from . import zeroshot

    session = Session.from_args(args)
    model, processor = session.model, session.processor
    with torch.inference_mode():
        # The labels are embedded once for the whole run, not once per batch of images.
        text = processor(text=texts).to(session.device)
        label_embeds = model.get_text_features(text["input_ids"], text["attention_mask"]).float()
        label_rows = (label_embeds / label_embeds.norm(dim=-1, keepdim=True)).cpu().numpy()
        scale = float(model.logit_scale.detach().float().exp())

        results = []
        ip = processor.image_processor
        for start in range(0, len(args.images), args.batch_size):
            names = args.images[start : start + args.batch_size]
            crops, good = [], []
            for name in names:
                try:
                    crops.append(ip.prepare(name))
                    good.append(name)
                except AltCLIPError as exc:
                    results.append({"image": name, "error": str(exc)})
                    print(f"altclip-fast: skipped {exc}", file=sys.stderr)
            if not crops:
                continue
            pixels = torch.from_numpy(ip.to_pixel_values(crops)).to(session.device, session.dtype)
            image_embeds = model.get_image_features(
                pixels, interpolate_pos_encoding=session.interpolate_pos_encoding
            ).float()
            image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
            probs = zeroshot.probabilities(image_embeds.cpu().numpy(), label_rows, scale)
            for name, row in zip(good, probs):
                results.append({
                    "image": name,
                    "predictions": [{"label": labels[i], "probability": round(float(row[i]), 6)}
                                    for i in zeroshot.ranking(row, args.top_k)],
                })
    order = {name: i for i, name in enumerate(args.images)}
    results.sort(key=lambda r: order[r["image"]])
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        print(_table(results))
    return 0 if any("predictions" in r for r in results) else 1


def _width(text: str) -> int:
    """Terminal columns: CJK and other wide characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _table(results: list[dict]) -> str:
    width = max([_width(p["label"]) for r in results for p in r.get("predictions", [])] + [5])
    lines = []
    for r in results:
        lines.append(r["image"])
        if "error" in r:
            lines.append(f"  (skipped: {r['error']})")
        for p in r.get("predictions", []):
            pad = " " * (width - _width(p["label"]))
            lines.append(f"  {p['label']}{pad}  {100 * p['probability']:6.2f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- embed


def cmd_embed(args) -> int:
    from .embedding.job import EmbedJob
    from .embedding.run import run

    if (args.out is None) == (args.out_dir is None):
        raise UsageError("give exactly one of --out FILE (one file) or --out-dir DIR (shards)")
    common = dict(
        input=args.input, model=args.model, batch_size=args.batch_size, workers=args.workers,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        exif_transpose=not args.no_exif_transpose, fast_decode=args.fast_decode,
    )
    if args.out is not None:
        for flag, given in (("--shard-size", args.shard_size is not None), ("--with-text", args.with_text),
                            ("--emb-dtype", args.emb_dtype is not None), ("--no-normalize", args.no_normalize),
                            ("--engine ray", args.engine != "local")):
            if given:
                raise UsageError(f"{flag} needs --out-dir")
        return run(EmbedJob(out=args.out, normalize=args.normalize, **common), lambda: Session.from_args(args))
    return cmd_embed_collection(args, common)


def cmd_embed_collection(args, common: dict) -> int:
    from .embedding.job import EmbedJob
    from .embedding.run import run
    from .embedding.shards import DEFAULT_SHARD_SIZE

    if args.normalize and args.no_normalize:
        raise UsageError("--normalize and --no-normalize contradict each other")
    job = EmbedJob(
        out_dir=args.out_dir, shard_size=args.shard_size or DEFAULT_SHARD_SIZE, normalize=not args.no_normalize,
        emb_dtype=args.emb_dtype or "float16", with_text=args.with_text, engine=args.engine,
        ray_address=args.ray_address, ray_workers=args.ray_workers, ray_gpus_per_worker=args.ray_gpus_per_worker,
        ray_cpus_per_worker=args.ray_cpus_per_worker, **common,
    )
    return run(job, lambda: Session.from_args(args))


def cmd_search(args) -> int:
    from . import search

    return search.cmd_search(args, Session.from_args, default_model=DEFAULT_MODEL)


# ---------------------------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from . import serve

    return serve.run(args, lambda: Session.from_args(args))


# ---------------------------------------------------------------------------------------------- bench


def cmd_bench(argv: list[str]) -> int:
    from . import benchmark

    parser = _Parser(prog="altclip-fast bench", description="End-to-end benchmark of the fast model.")
    benchmark.add_arguments(parser)
    return int(benchmark.run(parser.parse_args(argv)) or 0)


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model options")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"local model directory or Hugging Face Hub id (default: {DEFAULT_MODEL})")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                       help="auto: bf16 (fp16 on pre-Ampere GPUs) on GPU, fp32 on CPU")
    group.add_argument("--batch-size", type=int, default=32, help="items per model call (default: 32)")
    group.add_argument("--no-exif-transpose", action="store_true",
                       help="ignore EXIF orientation (by default photos are turned upright, as transformers "
                            "does for image paths)")
    group.add_argument("--fast-decode", action="store_true",
                       help="decode large JPEGs at reduced scale (faster on camera photos; "
                            "pixels differ slightly from transformers')")
    group.add_argument("--image-size", type=int, default=None, metavar="N",
                       help="run images at N x N pixels (shortest edge resized to N, centre crop) instead of "
                            "the model's own size; the position embeddings are interpolated to match")

    parser = _Parser(prog="altclip-fast", description="Fast multilingual CLIP (AltCLIP): classify, embed, bench.")
    sub = parser.add_subparsers(dest="command", metavar="{classify,embed,search,serve,bench}")
    sub.required = True

    p = sub.add_parser("classify", parents=[common], help="zero-shot classification of images",
                       description="Zero-shot classification: the top-k labels per image with probabilities.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--labels", nargs="*", metavar="LABEL", help="candidate labels (any language)")
    p.add_argument("--template", default=None, help='prompt template, e.g. "a photo of a {}"')
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_classify)

    p = sub.add_parser("embed", parents=[common], help="embed a folder of images or a file of captions",
                       description="Embed images (a folder, searched recursively, or a glob) or captions (a text "
                                   "file, one per line) into an .npy or .safetensors file plus a metadata file "
                                   "(<out>.meta.json) mapping rows to inputs.")
    p.add_argument("input", metavar="INPUT", help="folder, glob (quote it: 'photos/**/*.jpg') or text file")
    p.add_argument("--out", default=None, help="output file: .npy or .safetensors")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write shards in clip-retrieval's layout instead: DIR/img_emb (or text_emb)/*_emb_{k}.npy, "
                        "DIR/metadata/metadata_{k}.parquet, DIR/skipped.parquet (INPUT may be webdataset tars)")
    p.add_argument("--shard-size", type=int, default=None, metavar="N", help="--out-dir: inputs per shard (default 100000)")
    p.add_argument("--emb-dtype", choices=["float16", "float32"], default=None,
                   help="--out-dir: the stored dtype (default float16, as clip-retrieval)")
    p.add_argument("--no-normalize", action="store_true", help="--out-dir: keep embeddings unnormalised")
    p.add_argument("--with-text", action="store_true",
                   help="--out-dir with webdataset input or image files: embed each sample's txt caption "
                        "(for files, a/b.txt beside a/b.jpg) too, row-aligned")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="--out-dir: where the work runs")
    p.add_argument("--ray-address", default=None, help="--engine ray: a cluster address (default: a local Ray)")
    p.add_argument("--ray-workers", type=int, default=1, help="--engine ray: model actors (default 1)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="--engine ray: GPUs per actor (default 1 on GPU clusters, 0 on CPU)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=None,
                   help="--engine ray: CPUs per actor, and so its torch threads (default: 1 with GPUs; CPU actors "
                        "share the cluster's CPUs but one, which decoding keeps, at most one node's worth each)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes that decode and resize images (default: one per spare "
                        "CPU core, up to 16)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (also one started with --overwrite), reusing its written batches")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output; discards an interrupted run unless --resume is given too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_embed)

    p = sub.add_parser("search", parents=[common], help="search an embed --out-dir collection",
                       description="Exact cosine search over a collection written by embed --out-dir: the top-k "
                                   "rows with score, shard, row and metadata.")
    p.add_argument("directory", metavar="DIR", help="an embed --out-dir folder")
    p.add_argument("--text", default=None, help="query text")
    p.add_argument("--image", default=None, metavar="PATH", help="query image")
    p.add_argument("--kind", choices=["img", "text"], default=None,
                   help="search img_emb or text_emb (default: img_emb when there is one)")
    p.add_argument("--top-k", type=int, default=10, help="rows shown (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    # --model left at its default: the model the collection was embedded with (its plan says which).
    # (Not set_defaults(model=None): the parents' actions are shared, so that would change every command.)
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("serve", parents=[common], help="OpenAI-compatible embedding server",
                       description="Serve /v1/embeddings (text and images), /v1/classify, /v1/models, /health "
                                   "and /metrics, batching concurrent requests together. Needs the serve extra: "
                                   "pip install 'altclip-fast[serve]'.")
    from .serve import add_arguments as add_serve_arguments  # argparse only: the web stack loads in run

    add_serve_arguments(p)
    p.set_defaults(run=cmd_serve)

    sub.add_parser("bench", help="end-to-end benchmark (see `altclip-fast bench --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            # The benchmark owns its options; they are read only when it runs, so that the other
            # commands (and --help) do not import it.
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if getattr(args, "batch_size", 1) < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        return int(args.run(args) or 0)
    except AltCLIPError as exc:
        print(f"altclip-fast: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt as exc:
        # One line: embed's Interrupted carries what is saved and how to finish; a bare Ctrl-C has no text.
        detail = f"; {exc}" if str(exc) else ""
        print(f"altclip-fast: interrupted{detail}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `altclip-fast classify ... | head`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (checkpoint errors may list names over several lines)."""
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
