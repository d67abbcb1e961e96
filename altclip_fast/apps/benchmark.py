"""End-to-end benchmark: altclip_fast against transformers (sdpa), same dtype, same process, interleaved.

No download is needed: by default both models get the BAAI/AltCLIP architecture with the same random
weights (``--model DIR`` benchmarks a real checkpoint instead). Workloads, through the embedding
getters (``get_image_features`` / ``get_text_features``), which is how embeddings are computed:

- images at several batch sizes (``--batches``; CPU default 1,8, GPU default 1,8,64,256);
- texts of realistic mixed lengths (``--texts`` of ``--min-tokens``..``--max-tokens`` tokens, padded to the
  longest, as a processor with ``padding=True`` produces).

On a GPU, batch 1 is also timed with each model captured in a CUDA graph (``--no-cuda-graphs`` skips
it): eager batch-1 latency there is mostly the host launching kernels, and a graph shows the GPU's share.

Rounds alternate which model runs first; a round repeats the call until it lasts ~0.2 s. The table
reports median throughput over rounds, the ratio of medians and the min-max of the per-round ratios
(the spread, which matters on a shared machine). Rows are printed, and the JSON rewritten, as each
workload finishes, so a run cut short keeps what it measured.
Accuracy: both models' embeddings on a few inputs against the fp32 reference (``reference``).

Run as ``altclip-fast bench`` or ``python -m altclip_fast.apps.benchmark``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..dtypes import resolve_dtype
from ..modeling.config import AltCLIPConfig
from ..modeling.model import AltCLIPModel, checkpoint_shapes

__all__ = ["add_arguments", "run", "main", "random_state_dict", "mixed_length_texts"]

_TINY = dict(
    text_config=dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, project_dim=48),
    vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=56, patch_size=14, projection_dim=32),
    projection_dim=32,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: BAAI/AltCLIP architecture, random weights)")
    parser.add_argument("--arch", choices=("baai", "tiny"), default="baai",
                        help="architecture for random weights (tiny: a seconds-long smoke run)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32: both models run in it")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batches", default=None, help="image batch sizes, comma-separated (CPU default 1,8; GPU 1,8,64,256)")
    parser.add_argument("--texts", type=int, default=64, help="texts per text batch (default 64; 0 skips texts)")
    parser.add_argument("--min-tokens", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per workload (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and the smallest batches: a short CPU run")
    parser.add_argument("--no-transformers", action="store_true", help="time altclip_fast alone")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="on a GPU, skip the extra batch-1 run with each model captured in a CUDA graph")
    parser.add_argument("--no-check", action="store_true", help="skip the accuracy check against the fp32 reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


# ---------------------------------------------------------------------------------------------- inputs


def random_state_dict(config: AltCLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 random weights for every checkpoint key (canonical layout), at scales that keep activations
    O(1) through the layers: LayerNorm gains near 1, small biases, weights ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(checkpoint_shapes(config).items()):
        if name == "logit_scale":
            state[name] = torch.tensor(config.logit_scale_init_value)
        elif len(shape) == 1 and any(s in name.lower() for s in ("norm", "_ln")):
            state[name] = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if name.endswith("weight") else (
                0.1 * torch.randn(shape, generator=gen))
        elif len(shape) == 1:
            state[name] = 0.02 * torch.randn(shape, generator=gen)
        elif "embedding" in name and "patch" not in name:
            state[name] = 0.5 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


def mixed_length_texts(config: AltCLIPConfig, count: int, lo: int, hi: int, seed: int = 0):
    """``count`` texts of lo..hi tokens (bos ... eos), right-padded to the longest, with the mask."""
    tc = config.text_config
    gen = torch.Generator().manual_seed(seed)
    hi = min(hi, tc.max_text_length)
    lo = max(2, min(lo, hi))
    lengths = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.full((count, width), tc.pad_token_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    for row, n in enumerate(lengths):
        body = torch.randint(3, tc.vocab_size, (n,), generator=gen)
        body[0], body[-1] = tc.bos_token_id, tc.eos_token_id
        ids[row, :n], mask[row, :n] = body, 1
    return ids, mask


def _pixels(config: AltCLIPConfig, batch: int, seed: int) -> torch.Tensor:
    vc = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, vc.num_channels, vc.image_size, vc.image_size), generator=gen)


# ---------------------------------------------------------------------------------------------- models


def _load_transformers(path: Path, dtype: torch.dtype, device: str):
    import transformers

    try:
        model = transformers.AltCLIPModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except TypeError:  # transformers 4 spells it torch_dtype
        model = transformers.AltCLIPModel.from_pretrained(path, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def _tensor(out) -> torch.Tensor:
    """transformers 5's getters return an output object, transformers 4's and ours a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalized(x: torch.Tensor) -> torch.Tensor:
    x = x.float().cpu()
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, calls: int = 1) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start


# A timed round repeats the call until it lasts about this long: one call of a small batch on a GPU
# takes a millisecond or less, too short for one perf_counter pair to time it well.
MIN_ROUND_S = 0.2


def _measure(runners: dict, items: int, rounds: int, device: str) -> dict:
    """Warm up each runner, then ``rounds`` interleaved timings (the order alternates per round).
    A round of a runner is ``calls_per_round`` back-to-back calls, chosen from the warm-up calls' time."""
    names = list(runners)
    times = {n: [] for n in names}
    peaks = {n: 0 for n in names}
    calls = {}
    for n in names:
        runners[n]()  # first call: allocations, autotuning, oneDNN primitive creation
        once = _timed(runners[n], device)
        if once < MIN_ROUND_S:  # short calls are cheap to time again, and the second may still be warming
            once = min(once, _timed(runners[n], device))
        calls[n] = max(1, math.ceil(MIN_ROUND_S / max(once, 1e-6)))
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[n].append(_timed(runners[n], device, calls[n]) / calls[n])
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
            "peak_mem_mb": peaks[n] / 2**20 if device.startswith("cuda") else None,
        }
    if len(names) == 2:
        fast, base = names
        per_round = [b / f for f, b in zip(times[fast], times[base])]
        result["ratio"] = result[base]["median_s"] / result[fast]["median_s"]
        result["ratio_min"], result["ratio_max"] = min(per_round), max(per_round)
    return result


def _cuda_graphed(fn):
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


# ---------------------------------------------------------------------------------------------- run


def _accuracy(config, state_or_path, dtype, device, models: dict, texts, pixels) -> dict:
    """Max |cosine-space error| of each model's embeddings against the fp32 reference."""
    import reference
    from ..modeling.checkpoint import load_into

    if isinstance(state_or_path, dict):
        with torch.device("meta"):
            ref = reference.AltCLIPModel(config)
        load_into(ref, state_or_path, dtype=torch.float32, device="cpu")
        ref.eval()
    else:
        ref = reference.AltCLIPModel.from_pretrained(state_or_path)
    ids, mask = texts
    with torch.no_grad():
        want_img = _normalized(ref.get_image_features(pixels))
        want_txt = _normalized(ref.get_text_features(ids, mask))
    del ref
    gc.collect()
    errors = {}
    for name, model in models.items():
        with torch.no_grad():
            img = _normalized(_tensor(model.get_image_features(pixel_values=pixels.to(device, dtype))))
            txt = _normalized(_tensor(model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))))
        errors[name] = {
            "image_embeds_max_abs": (img - want_img).abs().max().item(),
            "text_embeds_max_abs": (txt - want_txt).abs().max().item(),
        }
    return errors


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("altclip-fast bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype)
    gpu = device.startswith("cuda")
    if args.batches:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    else:
        batches = [1, 8, 64, 256] if gpu else [1, 8]
    rounds = args.rounds or (2 if args.quick else 5)
    if args.quick and not args.batches:
        batches = batches[:2]

    try:
        import transformers
    except ImportError:
        transformers = None
    compare = transformers is not None and not args.no_transformers
    notes = []
    if transformers is None and not args.no_transformers:
        notes.append("transformers is not installed: the comparison is skipped (pip install transformers)")

    with tempfile.TemporaryDirectory(prefix="altclip-bench-") as tmp:
        if args.model:
            source = args.model
            config = AltCLIPConfig.from_pretrained(args.model)
            fast = AltCLIPModel.from_pretrained(args.model, dtype=dtype, device=device)
            state = None
            weights_desc = str(args.model)
        else:
            config = AltCLIPConfig() if args.arch == "baai" else AltCLIPConfig(**_TINY)
            state = random_state_dict(config, args.seed)
            fast = AltCLIPModel.from_state_dict(config, state, dtype=dtype, device=device)
            weights_desc = ("BAAI/AltCLIP" if args.arch == "baai" else "tiny") + " architecture, random weights"
            source = None
            if compare:
                # transformers reads the same weights from disk, already in the benchmark dtype.
                from safetensors.torch import save_file

                save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, f"{tmp}/model.safetensors")
                Path(tmp, "config.json").write_text(json.dumps(config.to_dict()))
                source = tmp
        models = {"altclip_fast": fast}
        if compare:
            models["transformers"] = _load_transformers(source, dtype, device)

        texts = mixed_length_texts(config, args.texts, args.min_tokens, args.max_tokens, args.seed) if args.texts else None
        accuracy = None
        if not args.no_check:
            check_texts = mixed_length_texts(config, 8, args.min_tokens, args.max_tokens, args.seed + 1)
            accuracy = _accuracy(config, state if state is not None else args.model, dtype, device, models,
                                 check_texts, _pixels(config, 2, args.seed + 2))
        del state
        gc.collect()

        meta = {
            "weights": weights_desc,
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                                   f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "transformers": getattr(transformers, "__version__", None),
            "rounds": rounds,
            "command": " ".join(sys.argv),
            "notes": notes,
        }
        report = {"meta": meta, "results": [], "accuracy": accuracy}
        table = _Table(meta, compare, gpu)

        def record(row):
            # Each row is printed and saved as soon as it is measured: a run stopped by a time limit
            # keeps what it measured.
            report["results"].append(row)
            table.row(row)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))

        def image_runners(batch):
            pixels = _pixels(config, batch, args.seed).to(device, dtype)
            return {n: (lambda m=m: m.get_image_features(pixel_values=pixels)) for n, m in models.items()}

        for b in batches:
            runners = image_runners(b)
            with torch.inference_mode():
                record({"workload": f"images b={b}", "unit": "images/s", "batch": b,
                        **_measure(runners, b, rounds, device)})
        if texts is not None:
            ids, mask = (t.to(device) for t in texts)
            runners = {n: (lambda m=m: m.get_text_features(input_ids=ids, attention_mask=mask)) for n, m in models.items()}
            real = mask.float().mean().item()
            with torch.inference_mode():
                record({
                    "workload": f"texts {len(ids)} ({args.min_tokens}-{args.max_tokens} tok, padded {ids.shape[1]}, {real:.0%} real)",
                    "unit": "texts/s", "batch": len(ids), **_measure(runners, len(ids), rounds, device),
                })
        if gpu and not args.no_cuda_graphs:
            # Last: a failed capture can leave the CUDA context unusable for what would follow it.
            graphed = _graphed_runners(image_runners(1), notes)
            if graphed is not None:
                with torch.inference_mode():
                    record({"workload": "images b=1, CUDA graph", "unit": "images/s", "batch": 1,
                            **_measure(graphed, 1, rounds, device)})

    if gpu:
        from ..ops.dispatch import get_ops
        from ..ops.gemm_choice import gemm_mode

        # Which GEMM path each shape took (measured on this GPU on first use; see altclip_fast.gemm_choice).
        meta["gemm_mode"] = gemm_mode()
        meta["gemm_paths"] = get_ops("triton").gemm_paths.report()
    else:
        import resource

        # CPU allocations have no per-model counter: report the process's peak resident set instead.
        meta["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table.summary(meta, report["results"], accuracy)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _graphed_runners(runners: dict, notes: list) -> dict | None:
    """Each runner captured in a CUDA graph; a model whose capture fails is left out, with a note.
    None when ours cannot be captured (then there is nothing to compare)."""
    graphed = {}
    for name, fn in runners.items():
        try:
            with torch.inference_mode():
                graphed[name] = _cuda_graphed(fn)
        except Exception as exc:  # noqa: BLE001 - a failed capture is a finding to report, not a crash
            notes.append(f"CUDA graph capture failed for {name}: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"note: {notes[-1]}", flush=True)
    return graphed if "altclip_fast" in graphed else None


class _Table:
    """The human-readable report: a header, one line per workload as it is measured, then a summary."""

    def __init__(self, meta, compare, gpu):
        self.compare = compare
        print(f"altclip-fast bench: {meta['weights']}, {meta['dtype']}, {meta['device']}, torch {meta['torch']}"
              + (f", transformers {meta['transformers']}" if meta["transformers"] else "")
              + f", median of {meta['rounds']} interleaved rounds")
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

    def summary(self, meta, results, accuracy) -> None:
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
                print(f"max |error| vs fp32 reference, {name}: image embeds {err['image_embeds_max_abs']:.2e}, "
                      f"text embeds {err['text_embeds_max_abs']:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m altclip_fast.apps.benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
