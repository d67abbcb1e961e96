"""The end-to-end benchmark's report: a table printed row by row as each workload is measured, a
summary at the end, and the JSON (rewritten after every row, so a run cut short keeps what it measured)."""

from __future__ import annotations

import json
from pathlib import Path


class Report:
    """The results as they come: each row is printed and the JSON rewritten as soon as it is measured,
    so a run stopped by a time limit keeps what it measured."""

    def __init__(self, meta: dict, memory: dict, accuracy: dict | None, json_path: str | None, compare: bool,
                 gpu: bool):
        self.data = {"meta": meta, "model_bytes": memory, "results": [], "accuracy": accuracy}
        self.json_path = json_path
        self.table = Table(meta, memory, compare, gpu)

    def record(self, row: dict | None) -> None:
        if row is None:
            return
        self.data["results"].append(row)
        self.table.row(row)
        self.save()

    def save(self) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.data, indent=1))

    def finish(self, memory: dict) -> None:
        self.data["model_bytes"] = memory
        self.table.summary(self.data["meta"], memory, self.data["results"], self.data["accuracy"])
        self.save()


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def memory_line(memory: dict) -> str:
    return (f"altclip_fast model memory: {_mb(memory['parameters'])} parameters (checkpoint) + "
            f"{_mb(memory['derived'])} derived = {_mb(memory['resident'])} resident")


class Table:
    """The human-readable report: a header, one line per workload as it is measured, then a summary."""

    def __init__(self, meta, memory, compare, gpu):
        self.compare = compare
        print(f"altclip-fast bench: {meta['weights']}, {meta['dtype']}, {meta['device']}, torch {meta['torch']}"
              + (f", transformers {meta['transformers']}" if meta["transformers"] else "")
              + f", median of {meta['rounds']} interleaved rounds")
        print(memory_line(memory))
        for note in meta["notes"]:
            print(f"note: {note}")
        header = f"{'workload':<50} {'altclip_fast':>17}"
        if compare:
            header += f" {'transformers':>17} {'ratio':>7} {'(min-max)':>13}"
        if gpu:
            header += f" {'peak MB ours/theirs':>20}"
        print(header, flush=True)

    def row(self, r) -> None:
        both = self.compare and "transformers" in r
        line = f"{r['workload']:<50} {r['altclip_fast']['per_s']:>8.2f} {r['unit']:<8}"
        if both:
            line += f" {r['transformers']['per_s']:>8.2f} {r['unit']:<8}"
            line += f" {r['ratio']:>6.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        elif self.compare:
            line += f" {'-':>17} {'-':>7} {'':>13}"
        if r["altclip_fast"]["peak_mem_mb"] is not None:
            theirs = f"/{r['transformers']['peak_mem_mb']:.0f}" if both else ""
            line += f" {r['altclip_fast']['peak_mem_mb']:>12.0f}{theirs}"
        print(line, flush=True)

    def summary(self, meta, memory, results, accuracy) -> None:
        print(memory_line(memory))
        if meta.get("process_peak_rss_mb"):
            print(f"peak memory (CPU: whole process, every model loaded): {meta['process_peak_rss_mb']:.0f} MB")
        for r in results:
            if r["batch"] == 1:  # one item per call: its time is the latency a single request sees
                line = f"latency, {r['workload']}: altclip_fast {1e3 / r['altclip_fast']['per_s']:.2f} ms"
                if "transformers" in r:
                    line += f", transformers {1e3 / r['transformers']['per_s']:.2f} ms"
                print(line)
        if meta.get("gemm_paths"):
            won = [p["choice"] for p in meta["gemm_paths"]]
            print(f"GEMM path per shape (measured, {meta['gemm_mode']}): Triton kernel for {won.count('triton')}, "
                  f"torch (cuBLAS) for {won.count('torch')} of {len(won)} shapes; details in the JSON")
        elif meta.get("gemm_mode") in ("triton", "torch"):
            print(f"GEMM path forced by ALTCLIP_FAST_GEMM={meta['gemm_mode']}")
        if accuracy:
            for name, err in accuracy.items():
                print(f"max |error| vs fp32 reference ({meta['oracle']}), {name}: "
                      f"image embeds {err['image_embeds_max_abs']:.2e}, "
                      f"text embeds {err['text_embeds_max_abs']:.2e}")
