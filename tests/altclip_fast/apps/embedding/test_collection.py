"""``embed --out-dir`` (clip-retrieval's sharded layout), webdataset input and ``search``, on a tiny
random checkpoint. The SIGKILL test needs a process of its own; the rest run in process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.altclip_fast.apps.cli_helpers import cli_main, run_cli
from tests.altclip_fast.apps.embedding.collection_data import CPU, metadata, shards, write_collection
from tests.altclip_fast.processor_fixtures import photo_like

pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")





@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="module")
def folder_run(work):
    assert cli_main("embed", "photos", "--out-dir", "out", "--shard-size", 3, *CPU, cwd=work) == 0
    return work / "out"


def test_sharded_layout_schema_and_rows_match_single_file_embed(work, folder_run):
    out = folder_run
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".altclip-fast" not in p.parts)
    assert names == ["img_emb/img_emb_0.npy", "img_emb/img_emb_1.npy", "img_emb/img_emb_2.npy",
                     "metadata/metadata_0.parquet", "metadata/metadata_1.parquet", "metadata/metadata_2.parquet",
                     "skipped.parquet"]
    parts = shards(out)
    assert [len(p) for p in parts] == [3, 2, 1]  # 7 inputs listed, the broken one in shard 1 is skipped
    assert all(p.dtype == np.float16 and p.shape[1] == 12 for p in parts)
    rows = np.concatenate(parts).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=2e-3)
    schema = pq.read_schema(out / "metadata" / "metadata_0.parquet")
    assert schema.names == ["image_path", "key"] and all(t == pa.string() for t in schema.types)
    meta = metadata(out)
    # Typed relative to the working directory, stored absolute; the input folder is recorded once.
    photos = os.path.join(os.path.realpath(work), "photos")
    assert [m["image_path"] for m in meta] == [os.path.join(photos, n) for n in (
        "img0.png", "img1.png", "img2.png", "sub/img3.png", "sub/img4.png", "sub/img5.png")]
    assert json.loads((out / ".altclip-fast" / "plan.json").read_text())["input_root"] == photos
    skipped = pq.read_table(out / "skipped.parquet")
    assert skipped.schema.names == ["path", "key", "reason"]
    assert skipped.column("path").to_pylist() == ["photos/sub/broken.jpg"]
    # The same rows as today's single-file embed, within float16's tolerance.
    assert cli_main("embed", "photos", "--out", "single.npy", "--normalize", "--batch-size", 5, *CPU, cwd=work) == 0
    np.testing.assert_allclose(rows, np.load(work / "single.npy"), atol=2e-3)


def test_resume_after_sigkill_recomputes_only_missing_shards(work, folder_run):
    cmd = ["embed", "photos", "--out-dir", "killed", "--shard-size", 3, *CPU]
    proc = run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_SHARDS": "1"})
    assert proc.returncode == -9, proc.stderr
    out = work / "killed"
    assert (out / "img_emb" / "img_emb_0.npy").is_file() and not (out / "skipped.parquet").exists()
    assert cli_main(*cmd, cwd=work) == 2  # not without --resume
    changed = cli_main(*cmd, "--emb-dtype", "float32", "--resume", cwd=work)
    assert changed == 2  # the settings changed: refused
    # Resumed from another working directory, the input named another way: the same files, the same rows.
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("embed", "../photos", "--out-dir", "../killed", "--shard-size", 3, "--model", "../model", *CPU[2:],
                   "--resume", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "1 shards reused, 2 computed" in proc.stdout
    for a, b in zip(shards(out), shards(folder_run)):
        np.testing.assert_array_equal(a, b)
    assert metadata(out) == metadata(folder_run)
    assert not [p for p in out.rglob("*.tmp")]
    assert cli_main(*cmd, "--resume", cwd=work) == 0  # complete: nothing to do


def test_resume_reuses_the_saved_batches_of_an_unfinished_shard(work):
    """Killed inside a shard: --resume takes the batches that shard had saved (shown by one that was
    altered on disk coming through) and computes only the rest; everything else is a fresh run's."""
    cmd = ["embed", "photos", "--out-dir", "mid", "--shard-size", 3, "--batch-size", 1, *CPU]
    assert cli_main("embed", "photos", "--out-dir", "mid_fresh", "--shard-size", 3, "--batch-size", 1, *CPU, cwd=work) == 0
    proc = run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_BATCHES": "5"})
    assert proc.returncode == -9, proc.stderr
    out = work / "mid"
    # shard 0 is written; shard 1 (sub/broken.jpg, sub/img3.png, sub/img4.png) has its first two batches saved
    assert (out / "img_emb" / "img_emb_0.npy").is_file() and not (out / "img_emb" / "img_emb_1.npy").exists()
    saved = sorted((out / ".altclip-fast" / "parts" / "1").glob("*.npz"))
    assert len(saved) == 2
    with np.load(saved[1]) as z:
        part = {name: z[name] for name in z.files}
    assert part["idx"].tolist() == [4] and part["ok"].tolist() == [True]
    part["embedding"] = np.full_like(part["embedding"], 0.125)
    with open(saved[1], "wb") as f:
        np.savez(f, **part)
    proc = run_cli(*cmd, "--resume", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "1 shards reused, 2 computed from 2 inputs of saved batches and 2 new" in proc.stdout
    assert not (out / ".altclip-fast" / "parts").exists()
    got, want = shards(out), shards(work / "mid_fresh")
    np.testing.assert_array_equal(got[1][0], np.full(got[1].shape[1], 0.125, got[1].dtype))  # the saved batch
    got[1][0] = want[1][0]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert metadata(out) == metadata(work / "mid_fresh")
    assert (out / "skipped.parquet").read_bytes() == (work / "mid_fresh" / "skipped.parquet").read_bytes()


def test_resume_refuses_a_changed_listing(work, tmp_path):
    photos = tmp_path / "p"
    photos.mkdir()
    for i in range(3):
        photo_like(30, 30, seed=i).save(photos / f"{i}.png")
    cmd = ["embed", str(photos), "--out-dir", str(tmp_path / "o"), "--shard-size", 2, *CPU]
    assert cli_main(*cmd, cwd=work) == 0
    photo_like(30, 30, seed=9).save(photos / "3.png")
    assert cli_main(*cmd, "--resume", cwd=work) == 2
    assert cli_main(*cmd, "--overwrite", cwd=work) == 0
    assert sum(len(p) for p in shards(tmp_path / "o")) == 4


def test_captions_into_text_emb(work):
    assert cli_main("embed", "captions.txt", "--out-dir", "caps", "--emb-dtype", "float32", *CPU, cwd=work) == 0
    out = work / "caps"
    (emb,) = shards(out, "text")
    assert emb.shape == (4, 12) and emb.dtype == np.float32
    assert [m["caption"] for m in metadata(out)] == ["a cat", "a dog", "un chat", "一只狗"]
    assert pq.read_table(out / "skipped.parquet").column("reason").to_pylist() == ["blank line"]


def test_webdataset_with_text_corrupt_member_and_truncated_tar(work):
    pytest.importorskip("webdataset")
    assert cli_main("embed", "wds/{00000..00002}.tar", "--out-dir", "wout", "--with-text", *CPU, cwd=work) == 0
    out = work / "wout"
    meta = metadata(out)
    keys = [m["key"] for m in meta]
    assert keys[:3] == ["s0", "s2", "t0"] and "s1" not in keys
    assert meta[0]["caption"] == "a cat" and meta[0]["width"] == 40 and meta[0]["source"] == "x"
    (img,), (txt,) = shards(out, "img"), shards(out, "text")
    assert len(img) == len(txt) == len(meta)
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    reasons = {(Path(s["path"]).name, s["key"]): s["reason"] for s in skipped}
    assert any(k == ("00000.tar", "s1") and "cannot decode" in r for k, r in reasons.items()), reasons
    assert any(k == ("00000.tar", "s3") and "no image" in r for k, r in reasons.items()), reasons
    assert any(name == "00002.tar" and "unreadable tar" in r for (name, _), r in reasons.items()), reasons
    # the truncated copy's first sample came through before the damage
    assert [m["key"] for m in meta].count("t0") == 2
    # text rows are the captions' embeddings, aligned with the image rows
    assert cli_main("embed", "wds/00001.tar", "--out-dir", "wtxt", "--with-text", *CPU, cwd=work) == 0
    np.testing.assert_allclose(shards(work / "wtxt", "text")[0].astype(np.float32),
                               txt[2:4].astype(np.float32), atol=2e-3)


def test_search_self_retrieval(work, folder_run, capsys):
    from altclip_fast.apps.search import Index

    capsys.readouterr()
    assert cli_main("search", "out", "--image", "photos/sub/img4.png", "--top-k", 3, "--json",
                "--device", "cpu", "--dtype", "fp32", cwd=work) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["image_path"] == os.path.join(os.path.realpath(work), "photos/sub/img4.png")
    assert hits[0]["shard"] == 1 and hits[0]["row"] == 1 and hits[0]["score"] > 0.999
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # Index, chunked smaller than a shard: the same ranking as a dense product.
    index = Index(folder_run, chunk_rows=2)
    rows = np.concatenate(shards(folder_run)).astype(np.float32)
    queries = rows[[0, 5]] + 0.01
    scores, shard_ids, row_ids = index.search(queries, k=4)
    dense = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
    np.testing.assert_allclose(scores, -np.sort(-dense, axis=1)[:, :4], atol=1e-5)
    starts = np.cumsum([0] + [len(s) for s in shards(folder_run)])
    assert (starts[shard_ids] + row_ids == np.argsort(-dense, axis=1)[:, :4]).all()
    assert cli_main("search", "out", "--text", "a cat", "--device", "cpu", cwd=work) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6  # top 10 of 6 rows


def test_usage_errors(work, capsys):
    assert cli_main("embed", "photos", "--model", "model", cwd=work) == 2
    assert "exactly one of --out" in capsys.readouterr().err
    assert cli_main("embed", "photos", "--out", "x.npy", "--shard-size", "4", "--model", "model", cwd=work) == 2
    assert "--shard-size needs --out-dir" in capsys.readouterr().err
    assert cli_main("embed", "captions.txt", "--out-dir", "e", "--with-text", *CPU, cwd=work) == 2
    assert "--with-text needs webdataset input" in capsys.readouterr().err
    assert cli_main("search", "photos", "--text", "x", cwd=work) == 2
    assert "not an embed --out-dir collection" in capsys.readouterr().err
    # Checked before Ray (or the model) is touched.
    assert cli_main("embed", "photos", "--out-dir", "r", "--engine", "ray", "--ray-workers", "0", *CPU, cwd=work) == 2
    assert "--ray-workers must be at least 1, got 0" in capsys.readouterr().err
    assert cli_main("embed", "photos", "--out-dir", "r", "--engine", "ray", "--ray-cpus-per-worker", "0", *CPU, cwd=work) == 2
    assert "--ray-cpus-per-worker must be above 0, got 0.0" in capsys.readouterr().err
    assert cli_main("embed", "photos", "--out-dir", "r", "--engine", "ray", "--ray-gpus-per-worker", "-1", *CPU, cwd=work) == 2
    assert "--ray-gpus-per-worker must be at least 0, got -1.0" in capsys.readouterr().err


def test_ray_actors_get_a_share_of_the_cpus():
    from altclip_fast.apps.embedding.ray_engine import actor_cpus

    assert actor_cpus(2, 2, workers=1, gpus=0, requested=None) == 1.0  # the other core decodes
    assert actor_cpus(2, 2, workers=2, gpus=0, requested=None) == 0.5
    assert actor_cpus(16, 16, workers=2, gpus=0, requested=None) == 7.0  # 7 torch threads each, not 1
    assert actor_cpus(32, 16, workers=1, gpus=0, requested=None) == 16.0  # no more than a node has
    assert actor_cpus(1, 1, workers=1, gpus=0, requested=None) == 0.1
    assert actor_cpus(64, 64, workers=4, gpus=1, requested=None) == 1.0  # a GPU actor feeds its GPU
    assert actor_cpus(64, 64, workers=4, gpus=0, requested=3.0) == 3.0


def test_a_ray_actor_runs_torch_on_its_cpu_share(work):
    """Ray derives OMP_NUM_THREADS from an actor's CPUs; the actor sets torch's threads itself too."""
    import torch

    from altclip_fast.apps.runtime import Session, SessionSettings

    before = torch.get_num_threads()
    try:
        want = 1 if before > 1 else 2
        Session.from_settings(SessionSettings(str(work / "model"), "cpu", "float32", threads=want))
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
