"""The embedding pipeline's shared pieces: the one decode function on both sources (files and
encoded bytes), the one resume policy on the sharded writer (a changed file recomputed, the finished
shard holding it rewritten), and resume state saved by an older altclip-fast refused in one line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from altclip_fast.apps.embedding.decode import ImageFiles, collate_crops, decode, decode_columns
from altclip_fast.apps.runtime import load_processor
from altclip_fast.errors import AltCLIPError
from tests.altclip_fast.processor_fixtures import make_model_dir, photo_like
from tests.altclip_fast.apps.cli_helpers import cli_main, error_line

pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers

CPU = ["--model", "model", "--device", "cpu", "--dtype", "fp32", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    make_model_dir(root / "model")
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        photo_like(30 + i, 40 - i, seed=i).save(photos / f"{i}.png")
    (root / "captions.txt").write_text("a cat\na dog\nun chat\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------- decode


def test_decode_gives_the_same_crop_from_a_path_and_from_its_bytes(work, tmp_path):
    ip = load_processor(work / "model").image_processor
    path = work / "photos" / "3.png"
    from_path, no_reason = decode(ip, str(path))
    from_bytes, none_either = decode(ip, path.read_bytes())
    assert no_reason is None and none_either is None
    assert from_path.dtype == np.uint8 and from_path.shape == (3, *ip.prepare(str(path)).shape[1:])
    np.testing.assert_array_equal(from_path, from_bytes)

    # Each source keeps its reason texts: a file's is the image processor's without the path (the
    # caller names the file), encoded bytes say "cannot decode (...)".
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(AltCLIPError) as raised:
        ip.prepare(str(broken))
    crop, reason = decode(ip, str(broken))
    assert crop is None and reason == str(raised.value).removeprefix(f"{broken}: ") and str(broken) not in reason
    assert decode(ip, b"not an image") == (None, "cannot decode (not an image file pillow can read)")
    buf = io.BytesIO()
    photo_like(20, 20).save(buf, format="JPEG")
    crop, reason = decode(ip, buf.getvalue()[:-200])  # a truncated JPEG
    assert crop is None and reason.startswith("cannot decode (")

    # What the engines build on it: DataLoader items and their collation, and Ray's columns.
    items = [ImageFiles([str(path), str(broken)], ip)[i] for i in range(2)]
    indices, crops, skipped, reasons = collate_crops(items)
    assert indices == [0] and skipped == [1] and reasons == [reason_of_file(ip, broken)]
    np.testing.assert_array_equal(crops[0], from_path)
    columns = decode_columns(ip, [path.read_bytes(), str(broken)])
    assert columns["ok"].tolist() == [True, False] and columns["reason"][1] == reason_of_file(ip, broken)
    np.testing.assert_array_equal(columns["crop"][0], from_path)
    assert not columns["crop"][1].any()


def reason_of_file(ip, path: Path) -> str:
    return decode(ip, str(path))[1]


# ---------------------------------------------------------------------------------------------- resume policy


def _emb(out: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))]


def test_sharded_resume_recomputes_a_changed_file_and_rewrites_its_finished_shard(work, tmp_path, capsys):
    photos = tmp_path / "p"
    shutil.copytree(work / "photos", photos)
    cmd = ["embed", str(photos), "--out-dir", str(tmp_path / "o"), "--shard-size", 2, *CPU]
    assert cli_main(*cmd, cwd=work) == 0
    before = _emb(tmp_path / "o")
    untouched = {k: (tmp_path / "o" / "img_emb" / f"img_emb_{k}.npy").stat().st_mtime_ns for k in (0, 2)}
    capsys.readouterr()

    photo_like(33, 33, seed=99).save(photos / "2.png")  # another picture under the same name: shard 1
    assert cli_main(*cmd, "--resume", cwd=work) == 0
    captured = capsys.readouterr()
    assert "1 input files changed" in captured.err and "2.png" in captured.err
    assert "2 shards reused, 1 computed" in captured.out
    after = _emb(tmp_path / "o")
    for k in (0, 2):
        np.testing.assert_array_equal(after[k], before[k])
        assert (tmp_path / "o" / "img_emb" / f"img_emb_{k}.npy").stat().st_mtime_ns == untouched[k]
    assert not np.array_equal(after[1][0], before[1][0])
    np.testing.assert_array_equal(after[1][1], before[1][1])
    # What a fresh run over today's files writes.
    assert cli_main("embed", str(photos), "--out-dir", str(tmp_path / "fresh"), "--shard-size", 2, *CPU, cwd=work) == 0
    for a, b in zip(after, _emb(tmp_path / "fresh")):
        np.testing.assert_array_equal(a, b)
    # Nothing changed since: complete.
    assert cli_main(*cmd, "--resume", cwd=work) == 0
    assert "already complete" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- older state


@pytest.mark.parametrize("flags", [["--resume"], []], ids=["resume", "plain"])
def test_a_single_file_run_saved_by_an_older_version_is_refused_in_one_line(work, tmp_path, capsys, flags):
    target = tmp_path / "c.npy"
    partial = tmp_path / ".c.npy.partial"
    partial.mkdir()
    (partial / "plan.json").write_text(json.dumps({"version": 2, "kind": "text", "batch_size": 2}))
    np.savez(partial / "batch-000000.npz", embeddings=np.ones((2, 12), np.float32), indices=np.arange(2),
             skipped=np.zeros(0, np.int64), reasons=np.zeros(0, str))
    assert cli_main("embed", "captions.txt", "--out", target, *flags, *CPU, cwd=work) == 2
    line = error_line(capsys)
    assert "older altclip-fast" in line and "version that started it" in line and "--overwrite" in line
    assert (partial / "batch-000000.npz").is_file() and not target.exists()  # left as it was

    assert cli_main("embed", "captions.txt", "--out", target, *flags, "--overwrite", *CPU, cwd=work) == 0
    assert "starting over" in capsys.readouterr().err
    assert np.load(target).shape == (3, 12) and not partial.exists()


@pytest.mark.parametrize("version", [1, 3])  # 3: its saved batches hold image paths as typed, not absolute
def test_an_out_dir_saved_by_an_older_version_is_refused_in_one_line(work, tmp_path, capsys, version):
    out = tmp_path / "o"
    (out / ".altclip-fast").mkdir(parents=True)
    (out / ".altclip-fast" / "plan.json").write_text(json.dumps({"version": version, "inputs_sha256": "x"}))
    (out / "img_emb").mkdir()
    cmd = ["embed", "photos", "--out-dir", str(out), "--shard-size", 4, *CPU]
    assert cli_main(*cmd, "--resume", cwd=work) == 2
    line = error_line(capsys)
    assert f"older altclip-fast (plan version {version})" in line and "--overwrite" in line
    assert cli_main(*cmd, "--resume", "--overwrite", cwd=work) == 0
    assert sum(len(e) for e in _emb(out)) == 6


# ---------------------------------------------------------------------------------------------- webdataset


def test_webdataset_members_are_taken_for_the_one_list_of_image_extensions(work, tmp_path):
    pytest.importorskip("webdataset")
    pq = pytest.importorskip("pyarrow.parquet")
    import tarfile

    def encoded(fmt: str, seed: int) -> bytes:
        buf = io.BytesIO()
        photo_like(24, 20, seed=seed).save(buf, format=fmt)
        return buf.getvalue()

    members = [("a.bmp", encoded("BMP", 1)), ("b.tiff", encoded("TIFF", 2)), ("c.txt", b"a caption, no image")]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert cli_main("embed", str(tmp_path / "s.tar"), "--out-dir", str(tmp_path / "o"), *CPU, cwd=work) == 0
    rows = pq.read_table(tmp_path / "o" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [Path(r["image_path"]).name for r in rows] == ["a.bmp", "b.tiff"]
    skipped = pq.read_table(tmp_path / "o" / "skipped.parquet").to_pylist()
    assert skipped == [{"path": str(tmp_path / "s.tar"), "key": "c", "reason":
                        "no image member (jpg, jpeg, jfif, png, webp, bmp, gif, tif, tiff, ppm, pgm, pbm)"}]


# ---------------------------------------------------------------------------------------------- parts


def test_parts_are_read_back_in_listing_order_each_input_once(tmp_path):
    from altclip_fast.apps.embedding.parts import read_rows, read_shard, save_part, saved_inputs

    def part(idx):
        idx = np.asarray(idx, np.int64)
        return {"idx": idx, "ok": np.ones(len(idx), bool), "reason": np.asarray([""] * len(idx)),
                "embedding": np.repeat(idx[:, None].astype(np.float32), 3, axis=1)}

    # A resumed run's batch skips the inputs a saved part covers, so parts can interleave; a retried
    # batch rewrites its own part (same name), and a part may repeat an input another one holds.
    for idx in ([0, 2, 3], [1], [4, 5], [5, 6]):
        save_part(tmp_path, 7, part(idx))
    assert saved_inputs(tmp_path, [7]) == set(range(7))
    slices = list(read_rows(tmp_path, 7, range(7), ("idx", "embedding")))
    assert np.concatenate([s["idx"] for s in slices]).tolist() == list(range(7))
    assert max(len(s["idx"]) for s in slices) <= 3  # a part at a time, never the whole shard
    whole = read_shard(tmp_path, 7, range(7), ("embedding",))
    np.testing.assert_array_equal(whole["embedding"][:, 0], np.arange(7, dtype=np.float32))
    with pytest.raises(RuntimeError, match=r"miss inputs \[7\]"):
        read_shard(tmp_path, 7, range(8), ("embedding",))

    # A torn part (a power loss after the rename) fails its CRC check and is computed again.
    torn = next((tmp_path / "parts" / "7").glob("000000000004-*.npz"))
    torn.write_bytes(torn.read_bytes()[:-40])
    assert saved_inputs(tmp_path, [7]) == {0, 1, 2, 3, 5, 6} and not torn.exists()


def test_a_single_file_run_resumes_with_another_batch_size(work, tmp_path, monkeypatch, capsys):
    from altclip_fast.apps.embedding import encode

    full = tmp_path / "full.npy"
    assert cli_main("embed", "photos", "--out", full, "--batch-size", 4, *CPU, cwd=work) == 0
    real, calls = encode.encode, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    target = tmp_path / "p.npy"
    monkeypatch.setattr(encode, "encode", interrupting)
    assert cli_main("embed", "photos", "--out", target, "--batch-size", 2, *CPU, cwd=work) == 130
    monkeypatch.setattr(encode, "encode", real)
    capsys.readouterr()
    assert cli_main("embed", "photos", "--out", target, "--batch-size", 3, "--resume", *CPU, cwd=work) == 0
    assert "2 reused from the interrupted run, 4 computed now" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(target), np.load(full), rtol=1e-5, atol=1e-6)
