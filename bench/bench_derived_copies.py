"""What each derived weight form of the CPU prepare step costs (bytes) and buys (throughput) (issue 20).

One model is loaded once; each variant switches one form off by patching the prepare step while it
prepares, and every variant's derived forms are kept side by side, so switching variants is an
assignment. Variants then run interleaved, call by call in rotating order, so a busy neighbour slows
them all alike. The table gives each variant's best and median rate over the rounds and its ratio to
"all" (best / best); where the machine is shared, the best is the figure least bent by neighbours.

    PYTHONPATH=. python bench/bench_derived_copies.py MODEL_DIR [--rounds 8] [--dtype bfloat16]

Variants:
- all: what the prepare step makes today.
- no prepack: no oneDNN pre-blocked copies (oneDNN re-blocks each weight inside every GEMM); the
  quick_gelu fold still makes its scaled copies of the vision MLP weights.
- no fold: pre-blocked copies of the checkpoint's MLP weights; quick_gelu runs as its own pass.
- no q/kv prepack: the last layer's separate query and key/value weights stay views of the fused QKV.
- none: forward runs the parameters themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from altclip_fast.apps.benchmark import mixed_length_texts
from altclip_fast.modeling.layers import EncoderLayer
from altclip_fast.modeling.model import AltCLIPModel
from altclip_fast.ops.torch_backend import TorchOps

_plain_prepare = EncoderLayer.prepare


def _no_prepack():
    return mock.patch.object(TorchOps, "prepare_weight", lambda self, weight: weight)


def _no_fold():
    return mock.patch.object(TorchOps, "prepare_mlp", lambda self, w1, b1, w2, act, *, sources=None: (w1, b1, w2, act))


def _no_query_rows():
    def prepare(self, ops, sources=None, *, query_rows=False):
        return _plain_prepare(self, ops, sources, query_rows=False)

    return mock.patch.object(EncoderLayer, "prepare", prepare)


VARIANTS = {
    "all": [],
    "no prepack": [_no_prepack],
    "no fold": [_no_fold],
    "no q/kv prepack": [_no_query_rows],
    "none": [_no_prepack, _no_fold],
}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _snapshot(model):
    """The prepare step's output, to put back later: what forward runs, per layer and tower."""
    layers = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    towers = (model.text_model, model.vision_model)
    state = ([(m._prepared, m._mlp_act) for m in layers], [t._prepared for t in towers], model._prepared)

    def restore():
        for m, (prepared, act) in zip(layers, state[0]):
            m._prepared, m._mlp_act = prepared, act
        for t, prepared in zip(towers, state[1]):
            t._prepared = prepared
        model._prepared = state[2]

    return restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AltCLIPModel.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg, vc = model.config, model.config.vision_config
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn((b, vc.num_channels, vc.image_size, vc.image_size), generator=gen) for b in (1, 8)}
    ids, mask = mixed_length_texts(cfg, 64, 6, 48, seed=0)
    workloads = {  # name: (call, items per call, calls per round)
        "images b=1": (lambda: model.get_image_features(pixel_values=images[1]), 1, 2),
        "images b=8": (lambda: model.get_image_features(pixel_values=images[8]), 8, 1),
        "64 texts": (lambda: model.get_text_features(input_ids=ids, attention_mask=mask), 64, 1),
    }
    names = args.variants.split(",")
    restore, derived = {}, {}
    for variant in names:
        with contextlib.ExitStack() as stack:
            for patch in VARIANTS[variant]:
                stack.enter_context(patch())
            model.prepare()
        derived[variant] = model.derived_nbytes()
        restore[variant] = _snapshot(model)
        for fn, _, _ in workloads.values():
            fn()  # warm-up: oneDNN primitives for these shapes and weights
    rates = {v: {w: [] for w in workloads} for v in names}
    for r in range(args.rounds):
        for w, (fn, items, calls) in workloads.items():
            for _ in range(calls):
                for variant in names[r % len(names):] + names[: r % len(names)]:
                    restore[variant]()
                    rates[variant][w].append(items / _seconds(fn))
        print(f"round {r + 1}: " + "; ".join(
            f"{v} " + ", ".join(f"{rates[v][w][-1]:.2f}" for w in workloads) for v in names), flush=True)
    print(f"\nparameters {params / 1e9:.2f} GB, {args.dtype}, {args.rounds} rounds, {args.threads} threads\n")
    print("| variant | derived GB | derived per GB of parameters | "
          + " | ".join(f"{w}: best, median /s (best vs all)" for w in workloads) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in workloads) + " |")
    for v in names:
        cells = []
        for w in workloads:
            best, ref = max(rates[v][w]), max(rates[names[0]][w])
            cells.append(f"{best:.2f}, {statistics.median(rates[v][w]):.2f} ({best / ref:.2f}x)")
        print(f"| {v} | {derived[v] / 1e9:.3f} | {derived[v] / params:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
