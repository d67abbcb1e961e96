"""altclip-fast on CPU against what a CPU user would pick instead, in one run, engines interleaved.

Engines (``--engines``, comma-separated; each needs only what it names):

- ``fast-bf16``, ``fast-fp32``: altclip_fast's ``AltCLIPModel``;
- ``hf-bf16``, ``hf-compile-bf16``: transformers' ``AltCLIPModel`` (sdpa), eager and under ``torch.compile``;
- ``ov``, ``ov-f32``: OpenVINO (its default precision, bf16 on a CPU that has it; and f32), converted
  from the transformers model;
- ``ort-fp32``, ``ort-int8``: ONNX Runtime on the transformers model exported to ONNX, as is and with
  dynamic int8 quantization of the weights.

Every engine gets the same checkpoint (``--model DIR``, else random weights in the BAAI/AltCLIP
architecture, or ``--arch tiny`` for a smoke run) and the same inputs. Workloads: images at each batch
size of ``--batches``; ``--texts`` mixed-length texts as one padded batch, and the same texts sorted
by length in batches of ``--sorted-batch`` (what a user who sorts gets). Rounds alternate the engines'
order (``altclip_fast.apps.benchmark_timing.measure``), and the table gives the median throughput and
each engine's ratio to ``fast-bf16``. Accuracy: the minimum cosine of each engine's embeddings
against transformers in fp32, for images and for texts.

``--gemm`` adds the ceiling: one GEMM of the MLP's shape (``[rows, 1024] x [1024, 4096]``) through
torch's bf16 ``F.linear`` (oneDNN), torch's fp32 ``F.linear`` (MKL on x86) and ``mkldnn_linear``, and
OpenVINO's and ONNX Runtime's MatMul, in GFLOP/s.

Needs the ``[peers]`` extra (openvino, onnxruntime, onnx, onnxscript) for the ``ov*``/``ort*`` engines::

    pip install -e ".[peers]"
    python bench/bench_cpu_peers.py --threads 2 --json peers.json
    python bench/bench_cpu_peers.py --arch tiny --rounds 2      # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ENGINES = ("fast-bf16", "fast-fp32", "hf-bf16", "hf-compile-bf16", "ov", "ov-f32", "ort-fp32", "ort-int8")
BASELINE = "fast-bf16"


# ---------------------------------------------------------------------------------------------- towers


def _features(out):
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tower_modules(hf):
    """The transformers model's two getters as modules with tensor outputs (what the exporters trace)."""
    import torch

    class Images(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hf

        def forward(self, pixel_values):
            return _features(self.model.get_image_features(pixel_values=pixel_values))

    class Texts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hf

        def forward(self, input_ids, attention_mask):
            return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    return Images().eval(), Texts().eval()


def load_transformers(model_dir: Path, dtype):
    import transformers

    return transformers.AltCLIPModel.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------------------------------------- engines
# Each builder returns (images(pixels) -> [B, D] float32 numpy, texts(ids, mask) -> [B, D] float32 numpy).


def torch_engine(images_fn, texts_fn, dtype):
    import torch

    def images(pixels):
        with torch.inference_mode():
            return images_fn(pixels.to(dtype)).float().numpy()

    def texts(ids, mask):
        with torch.inference_mode():
            return texts_fn(ids, mask).float().numpy()

    return images, texts


def build_fast(model_dir: Path, dtype):
    from altclip_fast import AltCLIPModel

    model = AltCLIPModel.from_pretrained(model_dir, dtype=dtype).eval()
    return torch_engine(lambda p: model.get_image_features(p), lambda i, m: model.get_text_features(i, m), dtype)


def build_hf(model_dir: Path, dtype, compiled: bool):
    import torch

    image_tower, text_tower = tower_modules(load_transformers(model_dir, dtype))
    if compiled:
        image_tower, text_tower = torch.compile(image_tower), torch.compile(text_tower)
    return torch_engine(image_tower, text_tower, dtype)


def convert_openvino(hf32, example):
    """The two towers as OpenVINO models (converted once; each precision compiles its own copy)."""
    import openvino as ov
    import torch

    image_tower, text_tower = tower_modules(hf32)
    pixels, ids, mask = example
    with torch.no_grad():
        return (ov.convert_model(image_tower, example_input=(pixels,)),
                ov.convert_model(text_tower, example_input=(ids, mask)))


def build_openvino(converted, threads: int, precision: str | None):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    image_model, text_model = converted
    image_c = core.compile_model(image_model, "CPU", config)
    text_c = core.compile_model(text_model, "CPU", config)
    return (lambda p: image_c([p.numpy()])[0].astype("float32"),
            lambda i, m: text_c([i.numpy(), m.numpy()])[0].astype("float32"))


def export_onnx(hf32, example, folder: Path) -> tuple[Path, Path]:
    import torch

    image_tower, text_tower = tower_modules(hf32)
    pixels, ids, mask = example
    paths = folder / "images.onnx", folder / "texts.onnx"
    with torch.no_grad():
        torch.onnx.export(image_tower, (pixels,), str(paths[0]), input_names=["pixel_values"], output_names=["embeds"],
                          dynamic_axes={"pixel_values": {0: "batch"}}, dynamo=False)
        torch.onnx.export(text_tower, (ids, mask), str(paths[1]), input_names=["input_ids", "attention_mask"],
                          output_names=["embeds"], dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    return paths


def build_onnxruntime(paths: tuple[Path, Path], threads: int, int8: bool, folder: Path):
    import onnxruntime as ort

    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = []
        for path in paths:
            target = folder / f"{path.stem}.int8.onnx"
            if not target.exists():
                quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8, use_external_data_format=True)
            quantized.append(target)
        paths = tuple(quantized)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    image_s, text_s = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths)
    return (lambda p: image_s.run(None, {"pixel_values": p.numpy()})[0],
            lambda i, m: text_s.run(None, {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0])


def build_engines(names: list[str], model_dir: Path, example, threads: int, work: Path) -> dict:
    import torch

    engines, hf32, onnx_paths, ov_models = {}, None, None, None
    for name in names:
        started = time.perf_counter()
        if name == "fast-bf16":
            engines[name] = build_fast(model_dir, torch.bfloat16)
        elif name == "fast-fp32":
            engines[name] = build_fast(model_dir, torch.float32)
        elif name in ("hf-bf16", "hf-compile-bf16"):
            engines[name] = build_hf(model_dir, torch.bfloat16, compiled=name == "hf-compile-bf16")
        else:
            hf32 = hf32 if hf32 is not None else load_transformers(model_dir, torch.float32)
            if name in ("ov", "ov-f32"):
                ov_models = ov_models or convert_openvino(hf32, example)
                engines[name] = build_openvino(ov_models, threads, "f32" if name == "ov-f32" else None)
            else:
                onnx_paths = onnx_paths or export_onnx(hf32, example, work)
                engines[name] = build_onnxruntime(onnx_paths, threads, name == "ort-int8", work)
        print(f"built {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return engines


# ---------------------------------------------------------------------------------------------- workloads


def text_batches(ids, mask, sorted_batch: int):
    """The texts sorted by length, in batches of ``sorted_batch``, each cut to its own longest text."""
    lengths = mask.sum(dim=1)
    order = lengths.argsort(descending=True)
    batches = []
    for start in range(0, len(order), sorted_batch):
        rows = order[start:start + sorted_batch]
        width = int(lengths[rows].max())
        batches.append((ids[rows, :width].contiguous(), mask[rows, :width].contiguous()))
    return batches


def workloads(config, args) -> list[tuple[str, str, int, object]]:
    """``(name, unit, items, call(engine))`` per workload."""
    import torch

    from altclip_fast.apps.benchmark import mixed_length_texts

    vc = config.vision_config
    gen = torch.Generator().manual_seed(args.seed)
    found = []
    for b in [int(x) for x in args.batches.split(",")]:
        pixels = torch.randn((b, vc.num_channels, vc.image_size, vc.image_size), generator=gen)
        found.append((f"images b={b}", "img/s", b, lambda e, p=pixels: e[0](p)))
    if args.texts:
        ids, mask = mixed_length_texts(config, args.texts, args.min_tokens, args.max_tokens, args.seed)
        found.append((f"{args.texts} mixed texts, one batch", "texts/s", args.texts, lambda e: e[1](ids, mask)))
        batches = text_batches(ids, mask, args.sorted_batch)
        found.append((f"{args.texts} texts sorted by length, batches of {args.sorted_batch}", "texts/s", args.texts,
                      lambda e: [e[1](i, m) for i, m in batches]))
    return found


def accuracy(engines: dict, hf32, config, args) -> dict:
    """Minimum cosine of each engine's image and text embeddings against transformers in fp32."""
    import numpy as np
    import torch

    from altclip_fast.apps.benchmark import mixed_length_texts

    vc = config.vision_config
    pixels = torch.randn((4, vc.num_channels, vc.image_size, vc.image_size), generator=torch.Generator().manual_seed(99))
    ids, mask = mixed_length_texts(config, 16, args.min_tokens, args.max_tokens, seed=99)
    image_tower, text_tower = tower_modules(hf32)
    with torch.inference_mode():
        want_i, want_t = image_tower(pixels).numpy(), text_tower(ids, mask).numpy()

    def cosine(a, b):
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return float((a * b).sum(-1).min())

    return {name: {"images": cosine(e[0](pixels), want_i), "texts": cosine(e[1](ids, mask), want_t)}
            for name, e in engines.items()}


# ---------------------------------------------------------------------------------------------- GEMM ceiling


def gemm_ceiling(rows: int, threads: int, names: list[str]) -> dict:
    """GFLOP/s of one ``[rows, 1024] x [1024, 4096]`` GEMM (the MLP's up projection) per library."""
    import numpy as np
    import torch

    from altclip_fast.apps.benchmark_timing import measure

    k, n = 1024, 4096
    x32, w32 = torch.randn(rows, k), torch.randn(n, k) / 32
    runners = {"torch bf16 F.linear": (lambda x=x32.bfloat16(), w=w32.bfloat16(): torch.nn.functional.linear(x, w)),
               "torch fp32 F.linear": lambda: torch.nn.functional.linear(x32, w32)}
    from altclip_fast.ops import onednn

    if onednn.prepack_works(torch.bfloat16):  # what altclip-fast's bf16 GEMMs run: oneDNN, pre-blocked weight
        op, x16, packed16 = onednn.fused_linear(), x32.bfloat16(), onednn.prepack(w32.bfloat16())
        runners["altclip-fast bf16 (oneDNN fused linear, pre-packed)"] = lambda: op(x16, packed16, None, "none", [], None)
    if onednn.fused_linear_works(torch.float32):  # what its fp32 GEMMs run where oneDNN wins (plain weight)
        op = onednn.fused_linear()
        runners["altclip-fast fp32 (oneDNN fused linear)"] = lambda: op(x32, w32, None, "none", [], None)
    if torch.backends.mkldnn.is_available():
        import torch.utils.mkldnn

        linear = torch.nn.Linear(k, n, bias=False)
        linear.weight.data = w32
        packed = torch.utils.mkldnn.to_mkldnn(linear)  # oneDNN's fp32 GEMM on a pre-packed weight
        runners["torch fp32 mkldnn_linear"] = lambda: packed(x32)
    if any(n.startswith("ov") for n in names):
        import openvino as ov
        from openvino import opset13 as ops

        x_in = ops.parameter([rows, k], ov.Type.f32)
        model = ov.Model([ops.matmul(x_in, ops.constant(w32.numpy().T.copy()), False, False)], [x_in])
        for precision in ("bf16", "f32"):
            compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": precision})
            runners[f"OpenVINO {precision} MatMul"] = lambda c=compiled, a=x32.numpy(): c([a])
    if any(n.startswith("ort") for n in names):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
            [numpy_helper.from_array(np.ascontiguousarray(w32.numpy().T), "w")])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        onnx.checker.check_model(helper.make_model(graph))
        runners["ONNX Runtime fp32 MatMul"] = lambda a=x32.numpy(): session.run(None, {"x": a})
    result = measure(runners, items=1, rounds=5, device="cpu")
    flop = 2 * rows * k * n
    return {name: round(flop * r["per_s"] / 1e9, 1) for name, r in result.items() if isinstance(r, dict)}


# ---------------------------------------------------------------------------------------------- FLOPs, profile


def model_flops(config, sequence_lengths: list[int], tower: str) -> float:
    """Multiply-add FLOPs (x2) of one tower's encoder on these sequences: its GEMMs (QKV, output, MLP) and
    its attention products. Embeddings, norms, pooling and the projection are left out (under 1%)."""
    c = config.vision_config if tower == "vision" else config.text_config
    h, ffn, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    tokens = sum(sequence_lengths)
    gemm = 2 * tokens * (4 * h * h + 2 * h * ffn)
    attention = sum(4 * n * n * h for n in sequence_lengths)
    return layers * (gemm + attention)


def workload_flops(config, name: str, items: int, args) -> float | None:
    """FLOPs of one call of a workload (``workloads``' names), or None."""
    from altclip_fast.apps.benchmark import mixed_length_texts

    vc = config.vision_config
    if name.startswith("images"):
        return model_flops(config, [(vc.image_size // vc.patch_size) ** 2 + 1] * items, "vision")
    _, mask = mixed_length_texts(config, args.texts, args.min_tokens, args.max_tokens, args.seed)
    return model_flops(config, mask.sum(dim=1).tolist(), "text")


# torch profiler op names -> where the time goes
_CATEGORIES = (("GEMM", ("linear", "addmm", "::mm", "bmm", "matmul", "conv")),
               ("attention", ("scaled_dot_product", "flash_attention")),
               ("LayerNorm", ("layer_norm",)),
               ("activation", ("gelu", "silu", "sigmoid")),
               ("copies", ("copy", "index_select", "index_copy", "cat", "contiguous", "clone")),
               ("elementwise", ("add", "mul", "div", "sub")))


def profile_fast(engine, pixels) -> dict:
    """Self CPU time of altclip-fast's ops on one image batch, by category (milliseconds)."""
    from torch.profiler import ProfilerActivity, profile

    engine[0](pixels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine[0](pixels)
    found: dict[str, float] = {}
    for event in prof.key_averages():
        category = next((c for c, keys in _CATEGORIES if any(k in event.key for k in keys)), "other")
        found[category] = found.get(category, 0.0) + event.self_cpu_time_total / 1e3
    return {k: round(v, 1) for k, v in sorted(found.items(), key=lambda kv: -kv[1])}


def profile_openvino(hf32, pixels, threads: int) -> dict:
    """OpenVINO's own per-node timing (its PERF_COUNT property) on one image batch, by node type and kernel
    (milliseconds): what it fuses shows as one node (e.g. attention as a "Subgraph")."""
    import openvino as ov
    import torch

    image_tower, _ = tower_modules(hf32)
    with torch.no_grad():
        model = ov.convert_model(image_tower, example_input=(pixels[:2],))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": "YES",
                                                       "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.infer([pixels.numpy()])
    request.infer([pixels.numpy()])
    found: dict[str, float] = {}
    for node in request.get_profiling_info():
        key = f"{node.node_type} ({node.exec_type})"
        found[key] = found.get(key, 0.0) + node.real_time.total_seconds() * 1e3
    top = sorted(found.items(), key=lambda kv: -kv[1])
    return {k: round(v, 1) for k, v in top if v >= 0.5}


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: random weights, --arch)")
    parser.add_argument("--arch", choices=("baai", "tiny"), default="baai")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_cpu_peers"),
                        help="the random checkpoint and the ONNX exports are kept here between runs")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--sorted-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gemm", action="store_true", help="also measure one MLP-shaped GEMM per library")
    parser.add_argument("--profile", type=int, metavar="IMAGES", default=0,
                        help="also profile altclip-fast (torch profiler) and OpenVINO (PERF_COUNT) on this many images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from altclip_fast.apps.benchmark_timing import measure
    from altclip_fast.modeling.config import AltCLIPConfig
    from bench_serve import build_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if unknown := set(names) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    work = Path(args.work_dir) / args.arch
    model_dir = Path(args.model) if args.model else build_checkpoint(work / "model", args.arch)
    config = AltCLIPConfig.from_pretrained(model_dir)
    vc = config.vision_config
    from altclip_fast.apps.benchmark import mixed_length_texts

    example = (torch.randn(2, vc.num_channels, vc.image_size, vc.image_size), *mixed_length_texts(config, 2, 4, 9))
    engines = build_engines(names, model_dir, example, threads, work)
    hf32 = load_transformers(model_dir, torch.float32)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {threads} threads",
               "torch": torch.__version__, "engines": names, "model": str(model_dir), "workloads": []}
    results["accuracy"] = accuracy(engines, hf32, config, args)
    del hf32
    for name, unit, items, call in workloads(config, args):
        runners = {engine: (lambda e=e, c=call: c(e)) for engine, e in engines.items()}
        measured = measure(runners, items, args.rounds, "cpu")
        row = {"workload": name, "unit": unit,
               **{engine: round(measured[engine]["per_s"], 3) for engine in engines}}
        flops = workload_flops(config, name, items, args)
        if flops:  # model FLOPs per second, to hold against the GEMM ceiling
            row["gflops"] = {engine: round(flops * measured[engine]["per_s"] / items / 1e9, 1) for engine in engines}
        results["workloads"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:  # written before the GEMMs too, so that a failure there keeps the table
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.gemm:
        results["gemm_gflops"] = gemm_ceiling(8 * (vc.image_size // vc.patch_size) ** 2 + 8, threads, names)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    if args.profile:
        pixels = torch.randn((args.profile, vc.num_channels, vc.image_size, vc.image_size))
        results["profile_ms"] = {e: profile_fast(engines[e], pixels) for e in ("fast-bf16", "fast-fp32") if e in engines}
        if "ov" in names or "ov-f32" in names:
            engines.clear()  # OpenVINO compiles another copy of the model: make room
            hf32 = load_transformers(model_dir, torch.float32)
            results["profile_ms"]["ov (PERF_COUNT)"] = profile_openvino(hf32, pixels, threads)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results, names)
    return 0


def print_table(results: dict, names: list[str]) -> None:
    base = BASELINE if BASELINE in names else names[0]
    print(f"\n{results['machine']}, torch {results['torch']}; ratio to {base} in brackets\n")
    print("| engine | " + " | ".join(f"{w['workload']} ({w['unit']})" for w in results["workloads"])
          + " | min cosine images / texts |")
    print("| --- |" + " --- |" * (len(results["workloads"]) + 1))
    for name in names:
        cells = [f"{w[name]:.2f} ({w[name] / w[base]:.2f}x)" for w in results["workloads"]]
        acc = results["accuracy"][name]
        print(f"| {name} | " + " | ".join(cells) + f" | {acc['images']:.5f} / {acc['texts']:.5f} |")
    print("\nModel GFLOP/s (encoder GEMMs and attention products per second):\n")
    print("| engine | " + " | ".join(w["workload"] for w in results["workloads"] if "gflops" in w) + " |")
    print("| --- |" + " --- |" * sum("gflops" in w for w in results["workloads"]))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{w['gflops'][name]:.0f}" for w in results["workloads"] if "gflops" in w) + " |")
    for engine, where in results.get("profile_ms", {}).items():
        print(f"\nProfile of {engine}, one call (ms): " + ", ".join(f"{k} {v}" for k, v in where.items()))
    if "gemm_gflops" in results:
        print("\n| GEMM | GFLOP/s |\n| --- | --- |")
        for name, value in sorted(results["gemm_gflops"].items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
