"""The fp32 model on CPU with each GEMM library, and what a pre-blocked fp32 weight copy would add.

Three ways to run the fast model's fp32 GEMMs, on one loaded model, interleaved round by round:

- ``blas``: torch's ``F.linear`` (MKL on x86), the epilogue (activation, residual) in place after it;
- ``onednn``: oneDNN's fused linear on the parameters themselves (what ``ALTCLIP_FAST_CPU_FP32_GEMM``
  picks where it measures faster);
- ``onednn+prepack``: the same on weights pre-blocked for oneDNN, an fp32 copy of every GEMM weight
  (the library does not make it: this script switches the prepare step on for fp32 to measure what it
  would buy against the memory it would cost).

With ``--threads 1 --clock cpu`` the timings are the process's CPU time, which other processes on the
machine barely move; with more threads use ``--clock wall`` on a quiet machine. It also prints
``cpu_fp32_gemm.measure()``, the timing that ``auto`` decides on.

    python bench/bench_cpu_fp32_gemm.py --model DIR --threads 1 --clock cpu --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("blas", "onednn", "onednn+prepack")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: random weights in BAAI/AltCLIP's architecture)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--texts", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from altclip_fast import AltCLIPModel
    from altclip_fast.apps.benchmark import mixed_length_texts
    from altclip_fast.ops import cpu_fp32_gemm, get_ops
    from altclip_fast.ops.torch_backend import TorchOps
    from bench_serve import build_checkpoint

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model_dir = args.model or build_checkpoint(Path("/tmp/altclip_bench_cpu_peers/baai/model"), "baai")
    model = AltCLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids, mask = mixed_length_texts(model.config, args.texts, 6, 48, seed=0)
    print(f"cpu_fp32_gemm.measure() at {args.threads} threads: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in cpu_fp32_gemm.measure().items()))

    def use(mode: str) -> int:
        """Switch the model to ``mode``; returns the bytes of derived weight copies it then holds."""
        library = "blas" if mode == "blas" else "onednn"
        fp32_prepare = (lambda self, device, dtype: self._onednn(device, dtype)) if mode == "onednn+prepack" else None
        TorchOps._prepares = fp32_prepare or _prepares
        for tower in (model.text_model, model.vision_model):
            tower.ops = get_ops("torch", cpu_fp32_gemm=library)
            for i, layer in enumerate(tower.layers):
                layer.prepare(tower.ops, None, query_rows=i == len(tower.layers) - 1)
        return sum(layer.derived_nbytes() for t in (model.text_model, model.vision_model) for layer in t.layers)

    _prepares = TorchOps._prepares
    times = {(m, w): [] for m in MODES for w in ("images", "texts")}
    derived, answers = {}, {}
    with torch.inference_mode():
        for mode in MODES:
            derived[mode] = use(mode)
            answers[mode] = (model.get_image_features(pixels), model.get_text_features(ids, mask))
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                use(mode)
                for work, call in (("images", lambda: model.get_image_features(pixels)),
                                   ("texts", lambda: model.get_text_features(ids, mask))):
                    start = clock()
                    call()
                    times[(mode, work)].append(clock() - start)
    TorchOps._prepares = _prepares
    base = {w: statistics.median(times[("blas", w)]) for w in ("images", "texts")}
    print(f"\n{args.threads} thread(s), {args.clock} time, median of {args.rounds}; {args.images} image(s), "
          f"{args.texts} texts ({int(mask.sum())} tokens)\n")
    print("| GEMMs | images (s) | texts (s) | speed-up images / texts | derived copies (GB) | max diff vs blas |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        med = {w: statistics.median(times[(mode, w)]) for w in ("images", "texts")}
        diff = max((a - b).abs().max().item() for a, b in zip(answers[mode], answers["blas"]))
        print(f"| {mode} | {med['images']:.3f} | {med['texts']:.3f} | {base['images'] / med['images']:.2f}x / "
              f"{base['texts'] / med['texts']:.2f}x | {derived[mode] / 1e9:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
