"""``embed --out-dir`` killed while publishing a shard: what a reader of the folder sees, as
clip-retrieval's ``index`` reads it (every listed ``.npy`` with its metadata parquet, row for row),
and ``--resume`` finishing the run. The kill needs a process of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.altclip_fast.apps.cli_helpers import cli_main, run_cli
from tests.altclip_fast.apps.embedding.collection_data import CPU, metadata, shards, write_collection

pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_collection(tmp_path_factory.mktemp("publish"))


def unpaired_embeddings(out: Path) -> list[str]:
    """The ``img_emb_*.npy`` files a clip-retrieval index would read without their metadata rows."""
    bad = []
    for emb in sorted((out / "img_emb").glob("img_emb_*.npy")):
        meta = out / "metadata" / f"metadata{emb.stem[len('img_emb'):]}.parquet"
        if not meta.is_file() or pq.read_metadata(meta).num_rows != len(np.load(emb)):
            bad.append(emb.name)
    return bad


def test_a_kill_between_a_shards_files_never_leaves_embeddings_without_metadata(work):
    assert cli_main("embed", "photos", "--out-dir", "fresh", "--shard-size", 3, *CPU, cwd=work) == 0
    cmd = ["embed", "photos", "--out-dir", "torn", "--shard-size", 3, *CPU]
    proc = run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_BEFORE_SHARD_EMB": "1"})
    assert proc.returncode == -9, proc.stderr
    out = work / "torn"
    assert (out / "img_emb" / "img_emb_0.npy").is_file()  # shard 0 is complete; shard 1 was being published
    assert unpaired_embeddings(out) == []
    proc = run_cli(*cmd, "--resume", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "1 shards reused, 2 computed" in proc.stdout
    assert unpaired_embeddings(out) == []
    fresh = work / "fresh"
    assert [len(s) for s in shards(out)] == [len(s) for s in shards(fresh)] == [3, 2, 1]
    for a, b in zip(shards(out), shards(fresh)):
        np.testing.assert_array_equal(a, b)
    assert metadata(out) == metadata(fresh)
    assert (out / "skipped.parquet").read_bytes() == (fresh / "skipped.parquet").read_bytes()
    assert not [p for p in out.rglob("*.tmp")]
