"""Peak RSS of ``AltCLIPModel.from_pretrained`` against the model it leaves resident (issue 20).

Each load runs in a fresh subprocess, so the peak (``VmHWM``) is that load's alone. The resident
model is the parameter bytes plus the prepare step's derived copies (``derived_nbytes``).

    PYTHONPATH=. python bench/bench_load_memory.py MODEL_DIR --dtype bfloat16 float32 [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# VmHWM, not ru_maxrss: the latter starts from the forking process's peak.
_CHILD = r"""
import json, sys, time
import torch
import altclip_fast.modeling.model as m
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
start = time.perf_counter()
model = m.AltCLIPModel.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
peak = status("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters())
for p in model.parameters():  # weights still paged in from the file count once touched, as by a forward
    p.sum()
touched = status("VmHWM")
print(json.dumps(dict(before=before, peak=peak, touched=touched, params=params, derived=model.derived_nbytes(),
                      seconds=seconds)))
"""


def measure(model_dir: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model_dir, dtype], check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    resident = row["params"] + row["derived"]
    row.update(dtype=dtype, resident=resident, ratio=row["peak"] / resident, growth_ratio=(row["peak"] - row["before"]) / resident)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    gb = 1e9
    print("| dtype | parameters GB | derived GB | resident GB | RSS before load GB | peak RSS GB | peak / resident "
          "| peak after touching every weight GB | load s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for _ in range(args.repeat):
        for dtype in args.dtype:
            r = measure(args.model_dir, dtype)
            print(
                f"| {dtype} | {r['params'] / gb:.2f} | {r['derived'] / gb:.2f} | {r['resident'] / gb:.2f} | "
                f"{r['before'] / gb:.2f} | {r['peak'] / gb:.2f} | {r['ratio']:.2f} | {r['touched'] / gb:.2f} | "
                f"{r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
