"""The end-to-end benchmark runs (a seconds-long tiny architecture here) and reports what it promises:
throughput for both models, their ratio and spread, and the accuracy against the fp32 reference."""

from __future__ import annotations

import json
import sys

import pytest

from altclip_fast.apps import benchmark

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
    # fp32: both models agree with the reference to rounding.
    for name in ("altclip_fast", "transformers"):
        assert report["accuracy"][name]["image_embeds_max_abs"] < 1e-5
        assert report["accuracy"][name]["text_embeds_max_abs"] < 1e-5
    table = capsys.readouterr().out
    assert "ratio" in table and "texts 5" in table and "max |error| vs fp32 reference" in table


def test_bench_without_transformers_says_the_comparison_is_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    out = tmp_path / "bench.json"
    assert benchmark.main(ARGS + ["--json", str(out)]) == 0
    assert "comparison is skipped" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert all("transformers" not in r and "ratio" not in r for r in report["results"])
    assert report["meta"]["dtype"] == "bfloat16"


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

    res = benchmark._measure({"a": nap, "b": lambda: time.sleep(0.25)}, items=4, rounds=3, device="cpu")
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
        replay = benchmark._cuda_graphed(lambda: model.get_image_features(pixel_values=pixels))
        for seed in (1, 2):  # a graph reads its input buffer in place: new contents, new answer
            pixels.copy_(benchmark._pixels(config, 1, seed=seed))
            torch.testing.assert_close(replay(), model.get_image_features(pixel_values=pixels))
