"""``embed FOLDER --out-dir --with-text``: clip-retrieval's "files" input (``a/b.jpg`` captioned by
``a/b.txt``), embedded row-aligned as webdataset's ``txt`` is, on a tiny random checkpoint, in process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.altclip_fast.apps.cli_helpers import cli_main
from tests.altclip_fast.apps.embedding.collection_data import (
    CAPTIONED, CPU, metadata, shards, write_captioned_folder, write_collection,
)

pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = write_collection(tmp_path_factory.mktemp("files_text"))
    write_captioned_folder(root)
    return root


def _rows_per_shard(out: Path) -> list[int]:
    return [pq.read_metadata(p).num_rows for p in sorted((out / "metadata").glob("*.parquet"))]


def test_image_files_with_captions_beside_them_embed_row_aligned(work):
    cmd = ["embed", "captioned", "--out-dir", "ftxt", "--with-text", "--shard-size", 2, *CPU]
    assert cli_main(*cmd, cwd=work) == 0
    out = work / "ftxt"
    meta = metadata(out)
    embedded = ["img0.png", "img3.png", "sub/img1.jpg"]  # listed: broken, img0 | img3, sub/img1
    # absolute (the input was relative to the working directory): readable from anywhere
    assert [m["image_path"] for m in meta] == [os.path.join(os.path.realpath(work), "captioned", n) for n in embedded]
    assert [m["caption"] for m in meta] == [CAPTIONED[n] for n in embedded]
    assert [len(s) for s in shards(out, "img")] == [len(s) for s in shards(out, "text")] == _rows_per_shard(out) == [1, 2]
    skipped = {Path(s["path"]).name: s["reason"] for s in pq.read_table(out / "skipped.parquet").to_pylist()}
    assert skipped.keys() == {"img2.png", "broken.jpg"}
    assert skipped["img2.png"] == "no txt caption (--with-text)"
    # The text rows are the captions' own embeddings, the image rows the images', in the same order.
    (work / "caps.txt").write_text("".join(CAPTIONED[n] + "\n" for n in embedded), encoding="utf-8")
    assert cli_main("embed", "caps.txt", "--out-dir", "caps_only", *CPU, cwd=work) == 0
    np.testing.assert_allclose(np.concatenate(shards(out, "text")).astype(np.float32),
                               np.concatenate(shards(work / "caps_only", "text")).astype(np.float32), atol=2e-3)
    assert cli_main("embed", "captioned", "--out-dir", "imgs_only", *CPU, cwd=work) == 0
    alone = dict(zip((m["image_path"] for m in metadata(work / "imgs_only")),
                     np.concatenate(shards(work / "imgs_only", "img")).astype(np.float32)))
    np.testing.assert_allclose(np.concatenate(shards(out, "img")).astype(np.float32),
                               np.stack([alone[m["image_path"]] for m in meta]), atol=2e-3)
    # A changed caption is embedded again on --resume, as a changed image is; the rest is kept.
    (work / "captioned" / "img3.txt").write_text("a red car\n", encoding="utf-8")
    before = shards(out, "text")
    assert cli_main(*cmd, "--resume", cwd=work) == 0
    assert [m["caption"] for m in metadata(out)] == ["a cat", "a red car", "ein Hund"]
    np.testing.assert_array_equal(shards(out, "text")[0], before[0])
    assert not np.allclose(shards(out, "text")[1][0].astype(np.float32), before[1][0].astype(np.float32), atol=2e-3)


def test_with_text_refuses_caption_files_and_uncaptioned_folders(work, capsys):
    assert cli_main("embed", "captions.txt", "--out-dir", "e", "--with-text", *CPU, cwd=work) == 2
    assert "--with-text needs webdataset input" in capsys.readouterr().err
    assert cli_main("embed", "photos", "--out-dir", "e2", "--with-text", *CPU, cwd=work) == 2
    assert "no image has a caption beside it" in capsys.readouterr().err
