"""Images/s of AltCLIP preprocessing alone (no model): is it ever the bottleneck?

Writes JPEG photos at a few camera-like sizes to a temporary folder, then times, per size:

- ``prepare``: decode + RGB + bicubic shortest-edge resize + center crop, one process (what each
  DataLoader worker of ``altclip-fast embed`` does per image); ``prepare(fast_decode)`` the same
  with JPEGs decoded at reduced scale (``--fast-decode``);
- ``normalise``: rescale + normalise of a batch of crops (numpy table lookup; the CLI does the
  same lookup on the model's device);
- ``loader(W)``: the CLI's DataLoader with W workers, end to end (decode -> float32 batch);
- ``transformers``: transformers' PIL ``CLIPImageProcessor`` on the same paths, for comparison.

    python bench/bench_preprocess.py                      # 224 px, sizes 640x480 1600x1200 4032x3024
    python bench/bench_preprocess.py --count 64 --workers 4 --sizes 1024x768

Figures depend on the CPU and on how many cores are free; results/notes go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from altclip_fast.apps.embedding.decode import ImageFiles, collate_crops  # noqa: E402  (the CLI's own dataset)
from altclip_fast.preprocessing.image_processing import AltCLIPImageProcessor  # noqa: E402


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a shape and noise: decodes and resamples like a photo, unlike a flat colour."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    image = 0.2 + 0.6 * y * np.array([0.9, 0.7, 0.4], np.float32) + 0.2 * np.sin(9 * x + 4 * y)
    image = image + 0.05 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8), mode="RGB")


def _rate(count: int, fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def bench_size(folder: Path, width: int, height: int, args) -> dict[str, float]:
    base = _photo(width, height, seed=width)
    paths = []
    for i in range(args.count):
        path = folder / f"{width}x{height}_{i}.jpg"
        base.save(path, quality=90)
        paths.append(str(path))
    ip = AltCLIPImageProcessor(size=args.resolution, crop_size=args.resolution)
    rates = {}
    rates["prepare"] = _rate(len(paths), lambda: [ip.prepare(p) for p in paths])
    fast = AltCLIPImageProcessor(size=args.resolution, crop_size=args.resolution, fast_decode=True)
    rates["prepare(fast_decode)"] = _rate(len(paths), lambda: [fast.prepare(p) for p in paths])
    crops = [ip.prepare(p) for p in paths[: args.batch_size]]
    rates["normalise"] = _rate(len(crops), lambda: ip.to_pixel_values(crops), repeat=5)
    for workers in sorted({0, args.workers}):
        rates[f"loader({workers})"] = _rate(len(paths), lambda w=workers: _run_loader(paths, ip, w, args.batch_size))
    try:
        import transformers

        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        theirs = cls(size={"shortest_edge": args.resolution}, crop_size=args.resolution)
        rates["transformers"] = _rate(len(paths), lambda: [theirs(images=p, return_tensors="np") for p in paths])
    except ImportError:
        pass
    return rates


def _run_loader(paths, ip, workers: int, batch_size: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    batches = [list(range(i, min(len(paths), i + batch_size))) for i in range(0, len(paths), batch_size)]
    loader = DataLoader(ImageFiles(paths, ip), batch_sampler=batches, num_workers=workers, collate_fn=collate_crops)
    for _, crops, _, _ in loader:
        ip.to_pixel_values_torch(torch.from_numpy(crops))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1600x1200", "4032x3024"])
    parser.add_argument("--count", type=int, default=32, help="images per size")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()

    print(f"CPU cores: {os.cpu_count()}, images per size: {args.count}, output {args.resolution} px; images/s (best of 2)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            rates = bench_size(Path(tmp), width, height, args)
            rows.append((size, rates))
            print(f"{size:>10}: " + "  ".join(f"{k} {v:,.0f}" for k, v in rates.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
