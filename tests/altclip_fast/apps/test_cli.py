"""The ``altclip-fast`` console script, end to end in subprocesses, on a tiny random checkpoint.

Results are checked against transformers' ``AltCLIPModel`` loaded from the same directory, so a
wrong row order, a lost row or a mangled embedding fails here. Every subprocess pays for a torch
import (2-4 s), so runs are shared through module fixtures where the assertions allow it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from altclip_fast.preprocessing.processor import AltCLIPProcessor
from tests.altclip_fast.apps.cli_helpers import CPU_FP32, assert_one_line_error, run_cli
from tests.altclip_fast.processor_fixtures import make_model_dir, photo_like

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory with a model, a photo folder (one corrupt file, one non-image) and captions."""
    root = tmp_path_factory.mktemp("cli")
    make_model_dir(root / "model")
    photos = root / "photos"
    (photos / "trip" / "day2").mkdir(parents=True)
    sizes = [(40, 30), (30, 40), (64, 48), (33, 33), (90, 31), (45, 60)]
    for i, (w, h) in enumerate(sizes):
        folder = photos if i < 2 else photos / "trip" if i < 4 else photos / "trip" / "day2"
        photo_like(w, h, seed=i).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    good = (photos / "img0.jpg").read_bytes()
    (photos / "trip" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (photos / "notes.txt").write_text("not an image, and not picked up")
    (root / "captions.txt").write_text("a photo of a cat\n\n一只狗的照片\nصورة قطة\n  \nEin Foto 🐶\n", encoding="utf-8")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def oracle(work):
    """transformers' model and our processor (itself tested against transformers') on the same files."""
    model = transformers.AltCLIPModel.from_pretrained(work / "model").eval()
    return model, AltCLIPProcessor.from_pretrained(work / "model")


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; transformers 4 a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeddings(oracle, paths) -> np.ndarray:
    model, processor = oracle
    with torch.no_grad():
        return _features(model.get_image_features(pixel_values=processor(images=[str(p) for p in paths]).pixel_values)).numpy()


def text_embeddings(oracle, texts) -> np.ndarray:
    model, processor = oracle
    enc = processor(text=texts)
    with torch.no_grad():
        return _features(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)).numpy()


@pytest.fixture(scope="module")
def full_run(work):
    """One uninterrupted embed of the photo folder, with DataLoader workers."""
    out = work / "full" / "photos.npy"
    out.parent.mkdir()
    proc = run_cli("embed", "photos", "--out", out, "--model", "model", "--batch-size", 4, "--workers", 2,
                   *CPU_FP32, cwd=work)
    return proc, out


# ---------------------------------------------------------------------------------------------- embed


def test_embed_folder_skips_corrupt_image_and_maps_rows(work, full_run, oracle):
    proc, out = full_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # The summary line: how many were embedded, how many skipped and why.
    assert "embedded 6 images" in proc.stdout and "skipped 1: 1 unreadable" in proc.stdout
    assert "skipped photos/trip/broken.jpg: cannot decode" in proc.stderr
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    paths = [row["path"] for row in meta["rows"]]
    assert [row["row"] for row in meta["rows"]] == list(range(6))
    assert paths == sorted(paths) and len(paths) == 6 and not any("broken" in p or "notes" in p for p in paths)
    assert meta["skipped"] == [{"path": "photos/trip/broken.jpg", "reason": meta["skipped"][0]["reason"]}]
    assert meta["count"] == 6 and meta["dim"] == 12 and meta["normalized"] is False
    embeddings = np.load(out)
    assert embeddings.shape == (6, 12) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, image_embeddings(oracle, [work / p for p in paths]), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["photos.npy", "photos.npy.meta.json"]  # no leftovers


def test_embed_killed_then_resumed_reuses_written_batches(work, full_run):
    out = work / "resumed" / "photos.npy"
    out.parent.mkdir()
    cmd = ["embed", "photos", "--out", out, "--model", "model", "--batch-size", 2, "--workers", 0, *CPU_FP32]
    killed = run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_BATCHES": "1"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL right after the first batch file
    partial = out.parent / ".photos.npy.partial"
    # Nothing poses as complete: no output, no metadata, one finished batch (and the dead run's lock
    # file, which holds no lock once its process is gone).
    assert sorted(p.name for p in out.parent.iterdir()) == [".photos.npy.lock", ".photos.npy.partial"]
    assert sorted(p.name for p in partial.iterdir()) == ["inputs.json", "parts", "plan.json"]
    batch = partial / "parts" / "0" / "000000000000-000000000001.npz"  # the first batch's part: inputs 0 and 1
    assert [p.name for p in (partial / "parts" / "0").iterdir()] == [batch.name]

    # A second run without --resume refuses to mix with the interrupted one.
    assert_one_line_error(run_cli(*cmd, cwd=work), "pass --resume")

    # Mark the written batch (negate it: exact both ways): if --resume recomputed it, the mark would be gone.
    with np.load(batch) as data:
        saved = {k: data[k] for k in data.files}
    first = saved["embedding"][saved["ok"]].copy()
    with open(batch, "wb") as f:
        np.savez(f, **{**saved, "embedding": -saved["embedding"]})

    resumed = run_cli(*cmd, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 reused from the interrupted run, 5 computed now" in resumed.stdout
    final = np.load(out)
    np.testing.assert_array_equal(final[: len(first)], -first)
    # With the mark taken off, the result equals the uninterrupted run.
    final[: len(first)] *= -1
    np.testing.assert_allclose(final, np.load(full_run[1]), rtol=1e-5, atol=1e-6)
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    full_meta = json.loads(Path(f"{full_run[1]}.meta.json").read_text(encoding="utf-8"))
    assert meta["rows"] == full_meta["rows"] and meta["skipped"] == full_meta["skipped"]
    assert not partial.exists()

    # Resuming a finished output leaves it alone.
    before = np.load(out)
    again = run_cli(*cmd, "--resume", cwd=work)
    assert again.returncode == 0 and "already complete" in again.stdout
    np.testing.assert_array_equal(np.load(out), before)


def test_embed_killed_after_the_last_batch_resumes_without_recomputing(work):
    out = work / "last" / "c.npy"
    out.parent.mkdir()
    cmd = ["embed", "captions.txt", "--out", out, "--model", "model", "--batch-size", 3, *CPU_FP32]
    assert run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_BATCHES": "2"}).returncode == -9  # both batches
    resumed = run_cli(*cmd, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "embedded 4 captions" in resumed.stdout and "(4 reused from the interrupted run, 0 computed now)" in resumed.stdout


def test_embed_killed_while_publishing_an_overwrite_never_pairs_output_and_meta_of_two_runs(work):
    """Killed after the new output is renamed into place and before its metadata is: the old metadata
    is already gone, a plain rerun mentions the saved run, and --resume publishes a matching pair."""
    from altclip_fast.apps.embedding.single_file import load_embeddings, published_mismatch

    out = work / "publish" / "c.npy"
    out.parent.mkdir()
    cmd = ["embed", "captions.txt", "--out", out, "--model", "model", "--batch-size", 3, *CPU_FP32]
    assert run_cli(*cmd, cwd=work).returncode == 0
    old, old_meta = load_embeddings(out)
    killed = run_cli(*cmd, "--overwrite", "--normalize", cwd=work, env={"_ALTCLIP_FAST_CRASH_BEFORE_META": "1"})
    assert killed.returncode == -9, killed.stderr
    assert not Path(f"{out}.meta.json").exists() and published_mismatch(out) is not None
    assert not np.array_equal(np.load(out), old)  # the new output is in place, without metadata

    assert_one_line_error(run_cli(*cmd, cwd=work), "an interrupted run of it is saved")
    resumed = run_cli(*cmd, "--overwrite", "--normalize", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 reused from the interrupted run, 0 computed now" in resumed.stdout
    embeddings, meta = load_embeddings(out, verify=True)
    assert meta["normalized"] is True and meta["rows"] == old_meta["rows"]
    np.testing.assert_allclose(embeddings, old / np.linalg.norm(old, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.npy", "c.npy.meta.json"]


def test_embed_resume_refuses_other_settings_and_redoes_torn_batches(work, full_run):
    out = work / "changed" / "e.npy"
    out.parent.mkdir()
    cmd = ["embed", "photos", "--out", out, "--model", "model", "--batch-size", 3, "--workers", 0, *CPU_FP32]
    assert run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_BATCHES": "1"}).returncode == -9
    assert_one_line_error(run_cli(*cmd, "--resume", "--normalize", cwd=work), "normalize: False then, True now")
    # A batch file torn by a power loss (renamed, not yet flushed) is detected and computed again.
    batch = out.parent / ".e.npy.partial" / "parts" / "0" / "000000000000-000000000002.npz"
    batch.write_bytes(batch.read_bytes()[:-40])
    resumed = run_cli(*cmd, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "reused" not in resumed.stdout
    np.testing.assert_allclose(np.load(out), np.load(full_run[1]), rtol=1e-5, atol=1e-6)


def test_embed_captions_to_safetensors_then_overwrite(work, oracle):
    from safetensors.numpy import load_file

    out = work / "captions.safetensors"
    cmd = ["embed", "captions.txt", "--out", out, "--model", "model", "--batch-size", 3, *CPU_FP32]
    proc = run_cli(*cmd, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "embedded 4 captions" in proc.stdout and "skipped 2: 2 blank line" in proc.stdout
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    assert [(r["line"], r["text"]) for r in meta["rows"]] == [
        (1, "a photo of a cat"), (3, "一只狗的照片"), (4, "صورة قطة"), (6, "Ein Foto 🐶")]
    embeddings = load_file(str(out))["embeddings"]
    want = text_embeddings(oracle, [r["text"] for r in meta["rows"]])
    np.testing.assert_allclose(embeddings, want, rtol=1e-4, atol=1e-5)

    assert_one_line_error(run_cli(*cmd, cwd=work), "exists: pass --overwrite")
    proc = run_cli(*cmd, "--overwrite", "--normalize", cwd=work)
    assert proc.returncode == 0, proc.stderr
    normalized = load_file(str(out))["embeddings"]
    np.testing.assert_allclose(normalized, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    assert json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))["normalized"] is True


def test_embed_glob(work, full_run):
    out = work / "pngs.npy"
    proc = run_cli("embed", "photos/**/*.png", "--out", out, "--model", "model", "--workers", 0, *CPU_FP32, cwd=work)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))["rows"]
    assert [r["path"] for r in rows] == ["photos/img1.png", "photos/trip/day2/img5.png", "photos/trip/img3.png"]
    full_meta = json.loads(Path(f"{full_run[1]}.meta.json").read_text(encoding="utf-8"))
    full_rows = [r["row"] for r in full_meta["rows"] if r["path"].endswith(".png")]
    np.testing.assert_allclose(np.load(out), np.load(full_run[1])[full_rows], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- classify


def test_classify_json_and_table(work, oracle):
    labels = ["cat", "一只狗", "صورة", "car"]
    images = ["photos/img0.jpg", "photos/trip/broken.jpg", "photos/trip/img2.jpg"]
    proc = run_cli("classify", *images, "--labels", *labels, "--template", "a photo of a {}", "--top-k", 3,
                   "--json", "--model", "model", *CPU_FP32, cwd=work)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["image"] for r in results] == images
    assert "cannot decode" in results[1]["error"] and "broken.jpg" in proc.stderr

    model, processor = oracle
    with torch.no_grad():
        inputs = processor(text=[f"a photo of a {label}" for label in labels],
                           images=[str(work / images[0]), str(work / images[2])])
        probs = model(**inputs).logits_per_image.softmax(dim=-1).numpy()
    for result, want in zip([results[0], results[2]], probs):
        got = result["predictions"]
        assert len(got) == 3
        order = np.argsort(-want)[:3]
        assert [p["label"] for p in got] == [labels[i] for i in order]
        np.testing.assert_allclose([p["probability"] for p in got], want[order], atol=2e-5)

    table = run_cli("classify", images[0], "--labels", *labels, "--top-k", 2, "--model", "model", *CPU_FP32, cwd=work)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == images[0] and len(lines) == 3 and all(line.rstrip().endswith("%") for line in lines[1:])


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def no_weights(work) -> Path:
    directory = work / "no_weights"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(work / "model" / name, directory / name)
    return directory


@pytest.mark.parametrize(
    "args,expected",
    [
        (["embed", "missing_folder", "--out", "x.npy"], "missing_folder: no such file or directory"),
        (["classify", "missing.jpg", "--labels", "cat"], "missing.jpg: no such file"),
        (["embed", "empty", "--out", "x.npy"], "no images found"),
        (["classify", "photos/img0.jpg", "--labels"], "no labels"),
        (["classify", "photos/img0.jpg"], "no labels"),
        (["classify", "photos/img0.jpg", "--labels", "cat", "--model", "no_weights"], "has no weights"),
        (["classify", "photos/img0.jpg", "--labels", "cat", "--model", "someone/some-altclip"], "local directory"),
        (["embed", "photos", "--out", "x.csv"], "must end in .npy or .safetensors"),
        (["classify", "photos/img0.jpg", "--labels", "cat", "--template", "no slot"], "must contain {}"),
        (["embed", "photos", "--out", "x.npy", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
    ids=["missing-folder", "missing-image", "empty-folder", "empty-labels", "no-labels", "no-weights",
         "hub-offline", "bad-suffix", "bad-template", "unknown-option"],
)
def test_user_errors_are_one_line(work, no_weights, args, expected):
    if "--model" not in args:
        args = [*args, "--model", "model"]
    assert_one_line_error(run_cli(*args, cwd=work), expected)


def test_existing_output_needs_overwrite(work):
    (work / "taken.npy").write_bytes(b"precious")
    assert_one_line_error(run_cli("embed", "photos", "--out", "taken.npy", "--model", "model", cwd=work),
                          "taken.npy exists: pass --overwrite")
    assert (work / "taken.npy").read_bytes() == b"precious"


def test_bench_help(work):
    proc = run_cli("bench", "--help", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "usage: altclip-fast bench" in proc.stdout and "--arch" in proc.stdout


def test_nothing_readable_is_an_error_not_an_empty_file(work):
    bad = work / "all_bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    proc = run_cli("embed", "all_bad", "--out", "bad.npy", "--model", "model", "--workers", 0, *CPU_FP32, cwd=work)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "none of the 2 inputs could be embedded" in proc.stderr.strip().splitlines()[-1]
    assert "all_bad/a.jpg" in proc.stderr and "all_bad/b.png" in proc.stderr
    assert not (work / "bad.npy").exists() and not (work / ".bad.npy.partial").exists()


# ---------------------------------------------------------------------------------------------- in process


def test_classify_embeds_labels_once(work, monkeypatch, capsys):
    """Many image batches, one text-tower call for the labels."""
    from altclip_fast.apps import cli, runtime

    calls = {"text": 0, "image": 0}
    real_load = runtime.load_model

    def counting_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        text, image = model.get_text_features, model.get_image_features

        def count_text(*a, **k):
            calls["text"] += 1
            return text(*a, **k)

        def count_image(*a, **k):
            calls["image"] += 1
            return image(*a, **k)

        model.get_text_features, model.get_image_features = count_text, count_image
        return model

    monkeypatch.setattr(runtime, "load_model", counting_load)
    monkeypatch.chdir(work)
    images = ["photos/img0.jpg", "photos/img1.png", "photos/trip/img2.jpg"]
    assert cli.main(["classify", *images, "--labels", "cat", "dog", "--batch-size", "1", "--json",
                     "--model", "model", *CPU_FP32]) == 0
    assert calls == {"text": 1, "image": 3}
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == images


def test_the_command_line_imports_neither_torch_nor_the_reference():
    code = ("import sys, altclip_fast.apps.cli, altclip_fast.apps.embedding.run; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'reference', 'altclip_fast.reference')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_usage_error_is_public_and_exits_2():
    import altclip_fast
    from altclip_fast.apps import cli

    assert altclip_fast.UsageError is cli.UsageError and altclip_fast.UsageError.exit_code == 2
    assert issubclass(altclip_fast.UsageError, altclip_fast.AltCLIPError)


def test_device_and_dtype_choice():
    from altclip_fast.apps import runtime

    cpu = torch.device("cpu")
    assert runtime.pick_device("cpu") == cpu
    assert runtime.pick_dtype("auto", cpu) == torch.float32 and runtime.pick_dtype("bf16", cpu) == torch.bfloat16
    assert [runtime.pick_dtype(name, cpu) for name in ("fp32", "float32", "bfloat16")] == [
        torch.float32, torch.float32, torch.bfloat16]
    with pytest.raises(runtime.UsageError, match="fp16 is not supported on CPU"):
        runtime.pick_dtype("fp16", cpu)
    with pytest.raises(runtime.UsageError, match="not a device"):
        runtime.pick_device("tpu:banana")
    if torch.cuda.is_available():
        gpu = runtime.pick_device("auto")
        assert gpu.type == "cuda" and runtime.pick_dtype("auto", gpu) in (torch.bfloat16, torch.float16)
    else:
        assert runtime.pick_device("auto") == cpu
        with pytest.raises(runtime.UsageError, match="CUDA is not available"):
            runtime.pick_device("cuda")


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_dtype_asks_the_card_for_bf16(monkeypatch, capability, expected):
    """bf16 from Ampere on; a Turing card gets fp16 even where torch would emulate bf16 on it."""
    from altclip_fast import devices

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.auto_dtype(torch.device("cuda")) == expected
    assert devices.auto_dtype(torch.device("cpu")) == torch.float32
