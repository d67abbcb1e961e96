"""The end-to-end benchmark runs (a seconds-long tiny architecture here) and reports what it promises:
throughput for both models, their ratio and spread, the model's memory, and the accuracy against an
fp32 oracle (transformers when installed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from altclip_fast.apps import benchmark, benchmark_timing

ARGS = ["--arch", "tiny", "--rounds", "1", "--batches", "1,3", "--texts", "5", "--max-tokens", "12"]


def test_bench_compares_with_transformers_and_writes_json(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    assert benchmark.main(ARGS + ["--dtype", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["workload"].split(" (")[0] for r in report["results"]] == ["images b=1", "images b=3", "texts 5"]
    for r in report["results"]:
        for name in ("altclip_fast", "transformers"):
            assert r[name]["per_s"] > 0 and len(r[name]["times_s"]) == 1
        assert r["ratio"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    # fp32: both models agree with the oracle, transformers in fp32, to rounding.
    assert report["meta"]["oracle"] == "transformers"
    for name in ("altclip_fast", "transformers"):
        assert report["accuracy"][name]["image_embeds_max_abs"] < 1e-5
        assert report["accuracy"][name]["text_embeds_max_abs"] < 1e-5
    table = capsys.readouterr().out
    assert "ratio" in table and "texts 5" in table and "max |error| vs fp32 reference (transformers)" in table


def test_bench_without_transformers_says_the_comparison_is_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    out = tmp_path / "bench.json"
    assert benchmark.main(ARGS + ["--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "comparison is skipped" in table and "self-check" in table
    report = json.loads(out.read_text())
    assert all("transformers" not in r and "ratio" not in r for r in report["results"])
    assert report["meta"]["dtype"] == "bfloat16"
    # The oracle is then altclip_fast in fp32: bf16 against it is close but not exact.
    assert report["meta"]["oracle"] == "altclip_fast" and list(report["accuracy"]) == ["altclip_fast"]
    assert 0 < report["accuracy"]["altclip_fast"]["image_embeds_max_abs"] < 0.1
    assert "max |error| vs fp32 reference (altclip_fast)" in table


def test_bench_reports_the_models_resident_bytes(tmp_path, capsys):
    import torch

    from altclip_fast.modeling.config import AltCLIPConfig

    out = tmp_path / "bench.json"
    assert benchmark.main(ARGS + ["--dtype", "bf16", "--no-transformers", "--no-check", "--texts", "0",
                                  "--batches", "1", "--json", str(out)]) == 0
    memory = json.loads(out.read_text())["model_bytes"]
    config = AltCLIPConfig(**benchmark._TINY)
    model = benchmark.AltCLIPModel.from_state_dict(config, benchmark.random_state_dict(config),
                                                   dtype=torch.bfloat16, device="cpu")
    assert memory == benchmark.model_bytes(model)
    assert memory["parameters"] == sum(p.numel() * 2 for p in model.parameters()) > 0
    assert memory["derived"] >= 0 and memory["resident"] == memory["parameters"] + memory["derived"]
    table = capsys.readouterr().out.splitlines()
    line = f"{memory['parameters'] / 2**20:.1f} MB parameters (checkpoint)"
    # In the header and again in the summary.
    assert line in table[1] and sum(line in t for t in table) == 2


def test_bench_does_not_import_the_reference():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from altclip_fast.apps import benchmark\n"
        f"assert benchmark.main({ARGS!r} + ['--dtype', 'fp32', '--texts', '0', '--batches', '1']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['reference'], ['altclip_fast', 'reference'])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "max |error| vs fp32 reference (altclip_fast), altclip_fast: image embeds 0.00e+00" in proc.stdout


def test_mixed_length_texts_are_padded_to_the_longest():
    from altclip_fast.modeling.config import AltCLIPConfig

    ids, mask = benchmark.mixed_length_texts(AltCLIPConfig(), 64, 6, 48, seed=0)
    lengths = mask.sum(1)
    assert ids.shape == (64, int(lengths.max())) and 6 <= lengths.min() and lengths.max() <= 48
    assert (ids[:, 0] == 0).all() and (ids[mask == 0] == 1).all()


def test_rounds_repeat_short_calls_and_report_per_call_times():
    import time

    def nap():
        time.sleep(0.01)

    res = benchmark_timing.measure({"a": nap, "b": lambda: time.sleep(0.25)}, items=4, rounds=3, device="cpu")
    # A 10 ms call is repeated until a round lasts ~MIN_ROUND_S; a 250 ms call runs once per round.
    assert 10 <= res["a"]["calls_per_round"] <= 20 and res["b"]["calls_per_round"] == 1
    assert all(0.0095 < t < 0.02 for t in res["a"]["times_s"]) and len(res["a"]["times_s"]) == 3
    assert 3.5 < res["a"]["per_s"] / 100 < 4.2  # 4 items per ~10 ms call
    assert 15 < res["ratio"] < 27  # b's per-call time over a's


def test_a_run_cut_short_keeps_the_rows_already_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"

    def broken(*args, **kwargs):
        raise RuntimeError("stopped here")

    monkeypatch.setattr(benchmark.AltCLIPModel, "get_text_features", broken)
    with pytest.raises(RuntimeError, match="stopped here"):
        benchmark.main(ARGS + ["--no-transformers", "--no-check", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["workload"] for r in report["results"]] == ["images b=1", "images b=3"]
    assert "images b=3" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_the_model_on_new_input_contents():
    import torch

    from altclip_fast.modeling.config import AltCLIPConfig
    from altclip_fast.modeling.model import AltCLIPModel

    config = AltCLIPConfig(**benchmark._TINY)
    model = AltCLIPModel.from_state_dict(config, benchmark.random_state_dict(config), dtype=torch.float16,
                                         device="cuda")
    pixels = benchmark._pixels(config, 1, seed=0).to("cuda", torch.float16)
    with torch.inference_mode():
        replay = benchmark_timing.cuda_graphed(lambda: model.get_image_features(pixel_values=pixels))
        for seed in (1, 2):  # a graph reads its input buffer in place: new contents, new answer
            pixels.copy_(benchmark._pixels(config, 1, seed=seed))
            torch.testing.assert_close(replay(), model.get_image_features(pixel_values=pixels))
