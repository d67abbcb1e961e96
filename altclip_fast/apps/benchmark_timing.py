"""How the end-to-end benchmark times a workload: warm-up apart, interleaved rounds of back-to-back calls,
medians and per-round ratios; and CUDA-graph capture for the batch-1 latency on a GPU."""

from __future__ import annotations

import math
import statistics
import time

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, calls: int = 1) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - start


# A timed round repeats the call until it lasts about this long: one call of a small batch on a GPU
# takes a millisecond or less, too short for one perf_counter pair to time it well.
MIN_ROUND_S = 0.2


def measure(runners: dict, items: int, rounds: int, device: str) -> dict:
    """Warm up each runner, then ``rounds`` interleaved timings (the order alternates per round).
    A round of a runner is ``calls_per_round`` back-to-back calls, chosen from the warm-up calls' time."""
    names = list(runners)
    times = {n: [] for n in names}
    peaks = {n: 0 for n in names}
    calls, first = {}, {}
    for n in names:
        # The first call pays for allocations, autotuning, compilation and oneDNN primitive creation:
        # reported apart (first_call_s), since on a cold GPU it is what a short run cannot afford.
        first[n] = timed(runners[n], device)
        once = timed(runners[n], device)
        if once < MIN_ROUND_S:  # short calls are cheap to time again, and the second may still be warming
            once = min(once, timed(runners[n], device))
        calls[n] = max(1, math.ceil(MIN_ROUND_S / max(once, 1e-6)))
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[n].append(timed(runners[n], device, calls[n]) / calls[n])
            if device.startswith("cuda"):
                peaks[n] = max(peaks[n], torch.cuda.max_memory_allocated())
    result = {}
    for n in names:
        med = statistics.median(times[n])
        result[n] = {
            "per_s": items / med,
            "median_s": med,
            "times_s": times[n],
            "calls_per_round": calls[n],
            "first_call_s": first[n],
            "peak_mem_mb": peaks[n] / 2**20 if device.startswith("cuda") else None,
        }
    if len(names) == 2:
        fast, base = names
        per_round = [b / f for f, b in zip(times[fast], times[base])]
        result["ratio"] = result[base]["median_s"] / result[fast]["median_s"]
        result["ratio_min"], result["ratio_max"] = min(per_round), max(per_round)
    return result


def cuda_graphed(fn):
    """``fn`` (which must always get the same input tensors) captured in a CUDA graph: a replay launches
    every kernel at once, so the host's per-launch cost leaves the latency. Warm-up runs on a side stream
    first, as capture requires, and finishes any autotuning."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def graphed_runners(runners: dict, notes: list) -> dict | None:
    """Each runner captured in a CUDA graph; a model whose capture fails is left out, with a note.
    None when ours cannot be captured (then there is nothing to compare)."""
    graphed = {}
    for name, fn in runners.items():
        try:
            with torch.inference_mode():
                graphed[name] = cuda_graphed(fn)
        except Exception as exc:  # noqa: BLE001 - a failed capture is a finding to report, not a crash
            notes.append(f"CUDA graph capture failed for {name}: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"note: {notes[-1]}", flush=True)
    return graphed if "altclip_fast" in graphed else None
