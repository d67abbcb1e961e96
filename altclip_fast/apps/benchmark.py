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

Memory: the fast model's resident bytes, its parameters (the checkpoint's values) plus the derived
forms its backend prepared at load (``"model_bytes"`` in the JSON).
Accuracy: both models' embeddings on a few inputs against an fp32 oracle: transformers in fp32 when it
is installed (the parity contract), else altclip_fast itself in fp32 (a self-check, said so in the output).

Run as ``altclip-fast bench`` or ``python -m altclip_fast.apps.benchmark``; measured numbers are in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import auto_device
from ..dtypes import resolve_dtype
from ..modeling.config import AltCLIPConfig
from ..modeling.model import AltCLIPModel, checkpoint_shapes
from .benchmark_report import Report
from .benchmark_timing import graphed_runners, measure

__all__ = ["add_arguments", "run", "main", "random_state_dict", "mixed_length_texts", "model_bytes"]

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
    parser.add_argument("--no-check", action="store_true",
                        help="skip the accuracy check against the fp32 oracle (transformers in fp32 when installed)")
    parser.add_argument("--transformers-compile", action="store_true",
                        help="run transformers under torch.compile: the compiled baseline (its first call, "
                             "which compiles, is reported as first_call_s)")
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


# ---------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Settings:
    """Where and how long to measure: from the command line and the device's defaults."""

    device: str
    dtype: torch.dtype
    batches: list[int]
    rounds: int

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str) -> Settings:
        if args.batches:
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
        else:
            batches = [1, 8, 64, 256] if device.startswith("cuda") else [1, 8]
            if args.quick:
                batches = batches[:2]
        return cls(device, resolve_dtype(args.dtype), batches, args.rounds or (2 if args.quick else 5))


@dataclass
class Models:
    """The models under test (``altclip_fast`` first), and where their weights came from."""

    config: AltCLIPConfig
    timed: dict  # name -> model, in the benchmark's dtype and on its device
    weights: str  # for the report
    state: dict | None  # the fp32 random weights; None for a checkpoint
    directory: str | None  # a checkpoint transformers can load (the random weights written out), or None

    @property
    def fast(self) -> AltCLIPModel:
        return self.timed["altclip_fast"]


def _import_transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _load_models(args, settings: Settings, compare: bool, oracle_needs_files: bool, tmp: str) -> Models:
    dtype, device = settings.dtype, settings.device
    if args.model:
        config = AltCLIPConfig.from_pretrained(args.model)
        fast = AltCLIPModel.from_pretrained(args.model, dtype=dtype, device=device)
        models = Models(config, {"altclip_fast": fast}, str(args.model), None, args.model)
    else:
        config = AltCLIPConfig() if args.arch == "baai" else AltCLIPConfig(**_TINY)
        state = random_state_dict(config, args.seed)
        fast = AltCLIPModel.from_state_dict(config, state, dtype=dtype, device=device)
        weights = ("BAAI/AltCLIP" if args.arch == "baai" else "tiny") + " architecture, random weights"
        models = Models(config, {"altclip_fast": fast}, weights, state, None)
        if compare or oracle_needs_files:
            models.directory = write_checkpoint(config, state, torch.float32 if oracle_needs_files else dtype, tmp)
    if compare:
        hf = models.timed["transformers"] = _load_transformers(models.directory, dtype, device)
        if args.transformers_compile:
            hf.get_image_features = torch.compile(hf.get_image_features)
            hf.get_text_features = torch.compile(hf.get_text_features)
    return models


def write_checkpoint(config: AltCLIPConfig, state: dict, dtype: torch.dtype, directory: str) -> str:
    """The random weights as a checkpoint transformers reads. In fp32 when the fp32 oracle loads them
    too; transformers rounds them to the benchmark dtype on load, as ``.to(dtype)`` does."""
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, f"{directory}/model.safetensors")
    Path(directory, "config.json").write_text(json.dumps(config.to_dict()))
    return directory


def model_bytes(model) -> dict[str, int]:
    """Bytes the model holds: its parameters (the checkpoint's values, in the model's dtype), the
    derived forms its backend prepared (folded or pre-packed weights), and their sum."""
    parameters = sum(p.nbytes for p in model.parameters())
    derived = model.derived_nbytes()
    return {"parameters": parameters, "derived": derived, "resident": parameters + derived}


def _meta(settings: Settings, models: Models, transformers, oracle: str | None, notes: list) -> dict:
    device = (torch.cuda.get_device_name() if settings.gpu
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {
        "weights": models.weights,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "device": device,
        "torch": torch.__version__,
        "transformers": getattr(transformers, "__version__", None),
        "rounds": settings.rounds,
        "oracle": oracle,
        "command": " ".join(sys.argv),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- accuracy


def _oracle(args, models: Models, transformers):
    """The fp32 model the embeddings are checked against, on the CPU: transformers when installed."""
    if transformers is not None:
        return _load_transformers(models.directory, torch.float32, "cpu")
    if models.state is not None:
        return AltCLIPModel.from_state_dict(models.config, models.state, dtype=torch.float32, device="cpu").eval()
    return AltCLIPModel.from_pretrained(args.model, dtype=torch.float32, device="cpu").eval()


def _accuracy(oracle, models: dict, settings: Settings, texts, pixels) -> dict:
    """Max |cosine-space error| of each model's embeddings against the oracle's."""
    ids, mask = texts
    with torch.no_grad():
        want_img = _normalized(_tensor(oracle.get_image_features(pixel_values=pixels)))
        want_txt = _normalized(_tensor(oracle.get_text_features(input_ids=ids, attention_mask=mask)))
    errors = {}
    for name, model in models.items():
        with torch.no_grad():
            img = _normalized(_tensor(model.get_image_features(pixel_values=pixels.to(settings.device, settings.dtype))))
            txt = _normalized(_tensor(model.get_text_features(input_ids=ids.to(settings.device),
                                                              attention_mask=mask.to(settings.device))))
        errors[name] = {
            "image_embeds_max_abs": (img - want_img).abs().max().item(),
            "text_embeds_max_abs": (txt - want_txt).abs().max().item(),
        }
    return errors


def _check(args, models: Models, transformers, settings: Settings) -> dict:
    oracle = _oracle(args, models, transformers)
    check_texts = mixed_length_texts(models.config, 8, args.min_tokens, args.max_tokens, args.seed + 1)
    accuracy = _accuracy(oracle, models.timed, settings, check_texts, _pixels(models.config, 2, args.seed + 2))
    del oracle
    gc.collect()
    return accuracy


# ---------------------------------------------------------------------------------------------- workloads


def _image_runners(models: dict, config: AltCLIPConfig, batch: int, settings: Settings, seed: int) -> dict:
    pixels = _pixels(config, batch, seed).to(settings.device, settings.dtype)
    return {n: (lambda m=m: m.get_image_features(pixel_values=pixels)) for n, m in models.items()}


def _image_row(models: Models, batch: int, settings: Settings, seed: int) -> dict:
    runners = _image_runners(models.timed, models.config, batch, settings, seed)
    with torch.inference_mode():
        return {"workload": f"images b={batch}", "unit": "images/s", "batch": batch,
                **measure(runners, batch, settings.rounds, settings.device)}


def _text_row(models: Models, texts, settings: Settings, args) -> dict:
    ids, mask = (t.to(settings.device) for t in texts)
    runners = {n: (lambda m=m: m.get_text_features(input_ids=ids, attention_mask=mask))
               for n, m in models.timed.items()}
    real = mask.float().mean().item()
    with torch.inference_mode():
        return {
            "workload": f"texts {len(ids)} ({args.min_tokens}-{args.max_tokens} tok, padded {ids.shape[1]}, {real:.0%} real)",
            "unit": "texts/s", "batch": len(ids), **measure(runners, len(ids), settings.rounds, settings.device),
        }


def _cuda_graph_row(models: Models, settings: Settings, seed: int, notes: list) -> dict | None:
    graphed = graphed_runners(_image_runners(models.timed, models.config, 1, settings, seed), notes)
    if graphed is None:
        return None
    with torch.inference_mode():
        return {"workload": "images b=1, CUDA graph", "unit": "images/s", "batch": 1,
                **measure(graphed, 1, settings.rounds, settings.device)}


def _device_memory(meta: dict, gpu: bool) -> None:
    """What the device's memory report says, into ``meta``."""
    if gpu:
        from ..ops import get_ops
        from ..ops.gemm_choice import gemm_mode

        # Which GEMM path each shape took (measured on this GPU on first use; see altclip_fast.ops.gemm_choice).
        meta["gemm_mode"] = gemm_mode()
        meta["gemm_paths"] = get_ops("triton").gemm_paths.report()
    else:
        import resource

        # CPU allocations have no per-model counter: report the process's peak resident set instead.
        meta["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    device = args.device or str(auto_device())
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("altclip-fast bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    settings = Settings.from_args(args, device)
    transformers = _import_transformers()
    compare = transformers is not None and not args.no_transformers
    oracle = None if args.no_check else ("transformers" if transformers is not None else "altclip_fast")
    notes = []
    if transformers is None and not args.no_transformers:
        notes.append("transformers is not installed: the comparison is skipped (pip install transformers)")
    if args.transformers_compile:
        notes.append("transformers runs under torch.compile" if compare else
                     "--transformers-compile has no effect: there is no transformers baseline")
    if oracle == "altclip_fast":
        notes.append("transformers is not installed: accuracy is checked against altclip_fast in fp32, "
                     "a self-check, not parity with transformers")

    with tempfile.TemporaryDirectory(prefix="altclip-bench-") as tmp:
        models = _load_models(args, settings, compare, oracle == "transformers", tmp)
        texts = mixed_length_texts(models.config, args.texts, args.min_tokens, args.max_tokens, args.seed) if args.texts else None
        accuracy = None if oracle is None else _check(args, models, transformers, settings)
        models.state = None
        gc.collect()

        meta = _meta(settings, models, transformers, oracle, notes)
        report = Report(meta, model_bytes(models.fast), accuracy, args.json, compare, settings.gpu)
        for b in settings.batches:
            report.record(_image_row(models, b, settings, args.seed))
        if texts is not None:
            report.record(_text_row(models, texts, settings, args))
        if settings.gpu and not args.no_cuda_graphs:
            # Last: a failed capture can leave the CUDA context unusable for what would follow it.
            report.record(_cuda_graph_row(models, settings, args.seed, notes))

    _device_memory(meta, settings.gpu)
    report.finish(model_bytes(models.fast))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m altclip_fast.apps.benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
