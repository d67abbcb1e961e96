"""``altclip-fast embed`` over a folder of photos: images/s of each engine, back to back in one run.

Four runs of the real CLI (one subprocess each, the same photos, the same flags):

- ``embed PHOTOS --out x.npy``                          the single-file embed;
- ``embed PHOTOS --out-dir d``                          the collection, local engine;
- ``embed PHOTOS --out-dir d --engine ray --ray-workers 1``;
- ``embed PHOTOS --out-dir d --engine ray --ray-workers 2``.

Each run's summary line gives its compute time. The single-file and local engines load the model
before their clock starts, so their rate excludes the model load. The Ray engine's clock starts after
the driver's own model load too, but it then includes starting Ray, the actors and each actor's
model load; so for Ray the script also watches the part files the actors write per batch and reports
a steady-state estimate: the images saved after every actor's first batch, over the time from that
point to the last batch. The wall time of each whole command (Python start-up, model load, Ray
start-up, writing the output) is reported too.

Without ``--model`` it writes a random checkpoint in BAAI/AltCLIP's full-size architecture (once,
into ``--work-dir``, as bench_serve.py does) with a small test tokenizer, so nothing is downloaded::

    python bench/bench_collection.py --images 16 --batch-size 4 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def write_photos(folder: Path, count: int, width: int, height: int) -> None:
    from tests.altclip_fast.processor_fixtures import photo_like

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo_like(width, height, seed=i).save(folder / f"photo_{i:05d}.jpg", format="JPEG", quality=90)


class PartWatcher:
    """Polls ``DIR/.altclip-fast/parts/*/*.npz`` (the Ray actors' per-batch files): when each first
    appeared and how many rows it holds."""

    def __init__(self, out_dir: Path, interval: float = 0.1):
        self.root, self.interval = out_dir / ".altclip-fast" / "parts", interval
        self.seen: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import numpy as np

        while not self._stop.is_set():
            for path in self.root.glob("*/*.npz"):
                if path.name not in self.seen:
                    now = time.perf_counter()
                    try:
                        with np.load(path) as part:
                            rows = len(part["idx"])
                    except (OSError, ValueError, KeyError):
                        continue  # removed (assembled) or not readable yet: try again
                    self.seen[path.name] = (now, rows)
            self._stop.wait(self.interval)

    def steady_rate(self, workers: int) -> dict | None:
        """Images/s after every actor has saved its first batch (the w-th part file), to the last."""
        events = sorted(self.seen.values())
        if len(events) <= workers:
            return None
        t0 = events[workers - 1][0]
        rows = sum(r for _, r in events[workers:])
        span = events[-1][0] - t0
        return {"parts": len(events), "images": rows, "seconds": round(span, 2),
                "images_per_s": round(rows / span, 3) if span > 0 else None}


def run_embed(name: str, model: Path, photos: Path, out_args: list[str], args, log: Path,
              ray_workers: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "altclip_fast.apps.cli", "embed", str(photos), *out_args,
               "--model", str(model), "--device", "cpu", "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--no-progress"]
    out_dir = Path(out_args[1]) if out_args[0] == "--out-dir" else None
    watcher = PartWatcher(out_dir) if ray_workers else None
    start = time.perf_counter()
    with open(log, "w") as err:
        if watcher:
            with watcher:
                proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                      timeout=args.timeout_s)
        else:
            proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=args.timeout_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {' '.join(command)}\n{proc.stdout}\n{tail}")
    summary = proc.stdout.strip().splitlines()[-1]
    # "embedded N images into X in 40.3s (0.4 images/s)" or "... N computed in 40.3s, 0.4 images/s)"
    match = re.search(r"embedded (\d+) images .* in ([\d.]+)s[ ,]", summary)
    if not match:
        raise SystemExit(f"{name}: cannot read the summary line {summary!r}")
    images, seconds = int(match.group(1)), float(match.group(2))
    row = {"engine": name, "images": images, "compute_s": seconds,
           "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
           "wall_s": round(wall, 1), "images_per_s_wall": round(images / wall, 3), "summary": summary,
           "command": " ".join(command[1:])}
    if watcher:
        row["steady"] = watcher.steady_rate(ray_workers)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: random full-size weights in --work-dir)")
    parser.add_argument("--arch", choices=["baai", "tiny"], default="baai", help="random checkpoint's architecture")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_collection"),
                        help="where the random checkpoint is kept between runs")
    parser.add_argument("--images", type=int, default=16, help="photos to embed (each engine embeds all of them)")
    parser.add_argument("--size", default="320x240", help="the photos' WIDTHxHEIGHT (JPEG)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="--batch-size of every run; small, so that Ray's per-batch files show its steady state")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--engines", default="embed,local,ray1,ray2",
                        help="which runs, in order: embed (single file), local, ray1, ray2 (comma-separated)")
    parser.add_argument("--timeout-s", type=float, default=600, help="per run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from bench_serve import build_checkpoint

    model = Path(args.model) if args.model else build_checkpoint(Path(args.work_dir) / args.arch, args.arch)
    width, height = (int(v) for v in args.size.lower().split("x"))
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - {"embed", "local", "ray1", "ray2"}:
        raise SystemExit(f"unknown engines {sorted(unknown)}")

    import torch

    results = {"model": str(model), "dtype": args.dtype, "images": args.images, "size": args.size,
               "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory(prefix="altclip_bench_collection_") as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        write_photos(photos, args.images, width, height)
        for name in engines:
            if name == "embed":
                out_args, workers = ["--out", str(tmp / "x.npy")], None
            else:
                out_dir = tmp / f"d_{name}"
                out_args = ["--out-dir", str(out_dir)]
                workers = None
                if name.startswith("ray"):
                    workers = int(name[3:])
                    out_args += ["--engine", "ray", "--ray-workers", str(workers)]
            row = run_embed(name, model, photos, out_args, args, tmp / f"{name}.log", workers)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            for leftover in (tmp / "x.npy", tmp / f"d_{name}"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
    by = {r["engine"]: r for r in results["runs"]}
    print(f"\n{args.images} photos {args.size}, --batch-size {args.batch_size}, --dtype {args.dtype}, CPU")
    print("| engine | images/s (CLI's compute time) | steady state (Ray: after each actor's first batch) | wall time |")
    print("| --- | --- | --- | --- |")
    for r in results["runs"]:
        steady = r.get("steady")
        steady_text = (f"{steady['images_per_s']} ({steady['images']} images in {steady['seconds']} s)"
                       if steady else "n/a (model loaded before the clock)")
        print(f"| {r['engine']} | {r['images_per_s']} ({r['compute_s']} s) | {steady_text} | {r['wall_s']} s |")
    if "embed" in by and "local" in by:
        ratio = by["local"]["images_per_s"] / by["embed"]["images_per_s"]
        results["local_over_embed"] = round(ratio, 3)
        print(f"local engine / single-file embed: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
