"""Thumbnails (``serve/thumbnails.py``): a row's own image as a small JPEG, read only below the collection's
recorded input root, through the upload decoder, cached in a bounded cache; and the ``image`` field of
``/knn-service`` and ``/metadata`` (``thumbnail`` with ``/v1/search``'s opt-in) on a served collection."""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from altclip_fast.apps.embedding.inputs import list_inputs
from altclip_fast.apps.serve import thumbnails as thumbs_module
from altclip_fast.apps.serve.thumbnails import ENTRY_COST, MAX_PER_REPLY, Thumbnails, confined_source
from tests.altclip_fast.apps.serve.helpers import huge_png_header, png

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nshowpage\n%%EOF\n"


def _decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "JPEG"
    image.load()
    return image


def _collection(tmp_path: Path, root: Path | None, name: str = "c") -> SimpleNamespace:
    """What ``Thumbnails`` reads of a served collection: its name and folder, whose plan records ``root``."""
    folder = tmp_path / f"coll-{name}"
    (folder / ".altclip-fast").mkdir(parents=True)
    plan = {"version": 4, "model": "m"}
    if root is not None:
        plan["input_root"] = str(root)
    (folder / ".altclip-fast" / "plan.json").write_text(json.dumps(plan))
    return SimpleNamespace(name=name, root=folder)


@pytest.fixture
def tree(tmp_path):
    """``inside/`` (the input root: a photo, a photo below, a link to a file outside, a link to a file
    inside, an EPS and a PNG claiming 81 megapixels) and ``outside/`` (a photo and a tar, both readable)."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (inside / "a.png").write_bytes(png(400, 300, seed=1))
    (inside / "sub" / "b.jpg").write_bytes(png(60, 90, seed=2, fmt="JPEG"))
    (outside / "secret.png").write_bytes(png(50, 50, seed=3))
    with tarfile.open(outside / "far.tar", "w") as tar:
        data = png(50, 50, seed=4, fmt="JPEG")
        info = tarfile.TarInfo("k.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    os.symlink(outside / "secret.png", inside / "link-out.png")
    os.symlink(inside / "a.png", inside / "sub" / "link-in.png")
    (inside / "x.eps").write_bytes(EPS)
    (inside / "huge.png").write_bytes(huge_png_header())
    return SimpleNamespace(inside=inside, outside=outside, tmp=tmp_path)


@pytest.fixture
def opened(monkeypatch):
    """Every path the thumbnails module opens (files and tars)."""
    paths: list[str] = []
    real_open, real_tar_open = builtins.open, tarfile.open

    def spy_open(path, *args, **kwargs):
        paths.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    def spy_tar_open(name=None, *args, **kwargs):  # the tarfile module's own: webdataset's calls pass too
        if name is not None:
            paths.append(os.fspath(name))
        return real_tar_open(name, *args, **kwargs)

    monkeypatch.setattr(thumbs_module, "open", spy_open, raising=False)
    monkeypatch.setattr(thumbs_module.tarfile, "open", spy_tar_open)
    return paths


def test_only_paths_below_the_real_root_resolve(tree):
    root = os.path.realpath(tree.inside)
    assert confined_source(str(tree.inside / "a.png"), root) == (os.path.join(root, "a.png"), None)
    assert confined_source("sub/b.jpg", root) == (os.path.join(root, "sub", "b.jpg"), None)  # relative: to the root
    assert confined_source(str(tree.inside / "sub" / "link-in.png"), root) == (os.path.join(root, "a.png"), None)
    for escaping in ("../outside/secret.png", str(tree.inside / ".." / "outside" / "secret.png"),
                     str(tree.outside / "secret.png"), str(tree.inside / "link-out.png"), "/etc/passwd",
                     str(tree.outside / "far.tar") + "/k.jpg", "../outside/far.tar/k.jpg",
                     str(tree.inside / "missing.png"), "", None, 7, "a.png\0x"):
        assert confined_source(escaping, root) is None, escaping


def test_rows_that_leave_the_root_get_no_image_and_nothing_outside_is_opened(tree, opened):
    thumbs = Thumbnails(64, 1 << 20)
    coll = _collection(tree.tmp, tree.inside)
    rows = [{"image_path": str(tree.inside / "a.png"), "caption": "kept"},
            {"image_path": "../outside/secret.png", "caption": "dotdot"},
            {"image_path": str(tree.outside / "secret.png"), "caption": "absolute"},
            {"image_path": str(tree.inside / "link-out.png"), "caption": "link"},
            {"image_path": str(tree.outside / "far.tar") + "/k.jpg", "caption": "tar outside"},
            {"image_path": str(tree.inside / "sub" / "b.jpg"), "caption": "kept too"}]
    before = [dict(r) for r in rows]
    thumbs.add(coll, list(enumerate(rows)))
    assert [("image" in r) for r in rows] == [True, False, False, False, False, True]
    assert [{k: v for k, v in r.items() if k != "image"} for r in rows] == before  # nothing else touched
    real_inside = os.path.realpath(tree.inside)
    assert opened and all(os.path.realpath(p).startswith(real_inside + os.sep) for p in opened), opened
    assert thumbs.made == 2


def test_a_thumbnail_is_a_jpeg_of_the_file_at_most_side_pixels(tree):
    thumbs = Thumbnails(64, 1 << 20)
    coll = _collection(tree.tmp, tree.inside)
    big = _decoded(thumbs.get(coll, 0, str(tree.inside / "a.png")))
    assert big.size == (64, 48)  # 400x300 shrunk, the aspect kept
    expected = np.asarray(Image.open(tree.inside / "a.png").convert("RGB").resize((64, 48)), np.float32)
    assert np.abs(np.asarray(big, np.float32) - expected).mean() < 12  # the same picture, JPEG-compressed
    small = _decoded(thumbs.get(coll, 1, str(tree.inside / "sub" / "b.jpg")))
    assert small.size == (43, 64)
    tiny = Thumbnails(256, 1 << 20)
    assert _decoded(tiny.get(coll, 1, str(tree.inside / "sub" / "b.jpg"))).size == (60, 90)  # never enlarged


def test_refused_formats_and_oversized_images_get_none(tree):
    thumbs = Thumbnails(64, 1 << 20)
    coll = _collection(tree.tmp, tree.inside)
    assert thumbs.get(coll, 0, str(tree.inside / "x.eps")) is None  # EPS would run Ghostscript
    assert thumbs.get(coll, 1, str(tree.inside / "huge.png")) is None  # over the 40-megapixel limit
    (tree.inside / "text.png").write_bytes(b"not an image at all")
    assert thumbs.get(coll, 2, str(tree.inside / "text.png")) is None
    assert thumbs.made == 0


def test_without_a_recorded_root_there_are_no_thumbnails(tree, opened):
    thumbs = Thumbnails(64, 1 << 20)
    for coll in (_collection(tree.tmp, None, "old"), _collection(tree.tmp, tree.tmp / "gone", "moved")):
        row = {"image_path": str(tree.inside / "a.png")}
        thumbs.add(coll, [(0, row)])
        assert "image" not in row
    assert opened == [] and thumbs.made == 0
    assert Thumbnails(0, 1 << 20).get(_collection(tree.tmp, tree.inside), 0, str(tree.inside / "a.png")) is None


def test_made_once_then_cached_within_a_byte_bound(tree):
    coll = _collection(tree.tmp, tree.inside)
    path = str(tree.inside / "a.png")
    thumbs = Thumbnails(64, 1 << 20)
    first = thumbs.get(coll, 0, path)
    assert thumbs.get(coll, 0, path) == first and thumbs.made == 1
    assert thumbs.cached_bytes == ENTRY_COST + len(first)
    # Room for one thumbnail: asking for three rows in turn keeps only the last; the first is made again.
    bound = ENTRY_COST + len(first) + 10
    small = Thumbnails(64, bound)
    for row in range(3):
        small.get(coll, row, path)
        assert small.cached_bytes <= bound
    small.get(coll, 0, path)
    assert small.made == 4
    none = Thumbnails(64, 0)
    none.get(coll, 0, path)
    none.get(coll, 0, path)
    assert none.made == 2 and none.cached_bytes == 0


def test_a_reply_gets_at_most_max_per_reply_thumbnails(tree):
    thumbs = Thumbnails(16, 1 << 24)
    coll = _collection(tree.tmp, tree.inside)
    rows = [(i, {"image_path": str(tree.inside / "a.png")}) for i in range(MAX_PER_REPLY + 5)]
    thumbs.add(coll, rows)
    assert sum("image" in r for _, r in rows) == MAX_PER_REPLY and "image" not in rows[-1][1]


def test_decoding_runs_off_the_event_loop(tree, monkeypatch):
    import asyncio

    names = []
    real = thumbs_module.make_thumbnail

    def spy(raw, side):
        names.append(threading.current_thread().name)
        return real(raw, side)

    monkeypatch.setattr(thumbs_module, "make_thumbnail", spy)
    thumbs = Thumbnails(32, 1 << 20)
    row = {"image_path": str(tree.inside / "a.png")}
    asyncio.run(thumbs.add_off_loop(_collection(tree.tmp, tree.inside), [(0, row)]))
    thumbs.close()
    assert "image" in row and names and all(n.startswith("altclip-thumbs") for n in names)


def _tar(path: Path, members: list[tuple[str, bytes]], links: tuple[tuple[str, str], ...] = ()) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def test_webdataset_rows_are_read_from_their_tar_member(tmp_path, opened):
    pytest.importorskip("webdataset")
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [("s0.jpg", png(80, 40, seed=5, fmt="JPEG")), ("s0.txt", b"one"),
                                ("s1.png", png(30, 30, seed=6)), ("s1.txt", b"two")],
         links=(("s2.jpg", "/etc/passwd"),))
    listing = list_inputs(str(shards / "00000.tar"))  # the rows embed --out-dir stores, and the root it records
    assert listing.root == str(shards) and [r["key"] for r in listing.rows] == ["s0", "s1"]
    coll = _collection(tmp_path, Path(listing.root))
    thumbs = Thumbnails(40, 1 << 20)
    rows = [dict(r) for r in listing.rows] + [{"image_path": f"{shards / '00000.tar'}/s2.jpg"}]
    thumbs.add(coll, list(enumerate(rows)))
    assert _decoded(rows[0]["image"]).size == (40, 20) and _decoded(rows[1]["image"]).size == (30, 30)
    assert "image" not in rows[2]  # a link member is not followed
    assert set(map(os.path.realpath, opened)) == {os.path.realpath(shards / "00000.tar")}


# ------------------------------------------------------------------------------------------- served


def _image_of(reply_row: dict) -> Image.Image:
    return _decoded(reply_row["image"])


def test_knn_service_and_metadata_carry_the_rows_own_images(knn_client, collection, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the server runs elsewhere than embed did (its input was relative)
    with knn_client() as client:
        got = client.post("/knn-service", json={"embedding_input": [1.0] * 12, "num_images": 7,
                                                "indice_name": "coll"}).json()
        meta = client.post("/metadata", json={"ids": [r["id"] for r in got], "indice_name": "coll"}).json()
    assert len(got) == 7
    for r, m in zip(got, meta):
        assert os.path.isabs(r["image_path"]) and m["metadata"]["image"] == r["image"]
        source = Image.open(r["image_path"]).convert("RGB")
        thumb = _image_of(r)
        assert thumb.size == source.size  # 40x32: under --thumbnail-size, kept as it is
        assert np.abs(np.asarray(thumb, np.float32) - np.asarray(source, np.float32)).mean() < 12


def _tampered(collection: Path, tmp_path: Path, paths: dict[int, str]) -> Path:
    """A copy of the collection whose metadata rows (global id -> image_path) name other files."""
    copy = tmp_path / "tampered"
    shutil.copytree(collection, copy)
    offset = 0
    for meta in sorted((copy / "metadata").glob("*.parquet")):
        table = pq.read_table(meta)
        column = table.column("image_path").to_pylist()
        for i in range(len(column)):
            column[i] = paths.get(offset + i, column[i])
        offset += len(column)
        pq.write_table(table.set_column(table.schema.get_field_index("image_path"), "image_path",
                                        pa.array(column, pa.string())), meta)
    return copy


def test_a_tampered_collection_never_shows_files_outside_its_root(app_client, collection, tmp_path, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(40, 32, seed=9))
    images = Path(json.loads((collection / ".altclip-fast" / "plan.json").read_text())["input_root"])
    # rows 1-4: a "../" path, an absolute path elsewhere, an absolute path that climbs out of the root, and a
    # link inside the root that points outside it (made here, removed after: the folder is shared)
    copy = _tampered(collection, tmp_path, {1: "../outside/secret.png", 2: str(outside / "secret.png"),
                                            3: os.path.join(images, os.path.relpath(outside / "secret.png", images)),
                                            4: str(images / "escape.png")})
    os.symlink(outside / "secret.png", images / "escape.png")
    try:
        query = {"embedding_input": [1.0] * 12, "num_images": 7}
        with app_client(collections=(("coll", str(collection)),)) as client:
            plain = client.post("/knn-service", json=query).json()
        with app_client(collections=(("coll", str(copy)),)) as client:
            got = client.post("/knn-service", json=query).json()
    finally:
        os.unlink(images / "escape.png")
    by_id = {r["id"]: r for r in got}
    assert {i for i, r in by_id.items() if "image" in r} == {0, 5, 6}
    for r in plain:  # everything but the tampered paths and their images is the untampered reply
        strip = {"image", "image_path"}
        assert {k: v for k, v in by_id[r["id"]].items() if k not in strip} == \
            {k: v for k, v in r.items() if k not in strip}
    real = os.path.realpath(images)
    assert all(os.path.realpath(p).startswith(real + os.sep) for p in opened), opened


def test_an_older_collection_serves_without_images(app_client, collection, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(collection, old)
    plan = old / ".altclip-fast" / "plan.json"
    recorded = json.loads(plan.read_text())
    del recorded["input_root"]
    plan.write_text(json.dumps({**recorded, "version": 3}))
    with app_client(collections=(("coll", str(old)),)) as client:
        reply = client.post("/knn-service", json={"embedding_input": [1.0] * 12, "num_images": 3})
    assert reply.status_code == 200 and len(reply.json()) == 3
    assert not any("image" in r for r in reply.json())


def test_v1_search_thumbnails_are_opt_in(knn_client):
    body = {"input": [0.5] * 12, "modality": "embedding", "collection": "coll", "top_k": 3}
    with knn_client() as client:
        plain = client.post("/v1/search", json=body).json()["data"]
        asked = client.post("/v1/search", json={**body, "thumbnails": True}).json()["data"]
    assert not any("thumbnail" in d or "image" in d["metadata"] for d in plain)
    assert all(_decoded(d["thumbnail"]).size == (40, 32) and "image" not in d["metadata"] for d in asked)
    assert [d["id"] for d in asked] == [d["id"] for d in plain]


def test_thumbnail_size_zero_turns_them_off(knn_client):
    with knn_client(thumbnail_size=0) as client:
        got = client.post("/knn-service", json={"embedding_input": [1.0] * 12, "num_images": 3}).json()
    assert len(got) == 3 and not any("image" in r for r in got)


def test_a_served_webdataset_collection_shows_its_tar_members(app_client, model_dir, tmp_path):
    pytest.importorskip("webdataset")
    from tests.altclip_fast.apps.cli_helpers import cli_main

    (tmp_path / "wds").mkdir()
    members = {f"s{i}": png(48, 36, seed=20 + i, fmt="JPEG") for i in range(3)}
    _tar(tmp_path / "wds" / "00000.tar", [(f"{k}.jpg", raw) for k, raw in members.items()])
    assert cli_main("embed", "wds/00000.tar", "--out-dir", "coll", "--model", model_dir, "--device", "cpu",
                    "--dtype", "fp32", "--workers", "0", "--no-progress", cwd=tmp_path) == 0
    with app_client(collections=(("wds", str(tmp_path / "coll")),)) as client:
        got = client.post("/knn-service", json={"embedding_input": [1.0] * 12, "num_images": 3}).json()
    assert sorted(r["key"] for r in got) == sorted(members)
    for r in got:
        assert r["image_path"] == f"{os.path.realpath(tmp_path)}/wds/00000.tar/{r['key']}.jpg"
        source = np.asarray(Image.open(io.BytesIO(members[r["key"]])).convert("RGB"), np.float32)
        assert np.abs(np.asarray(_image_of(r), np.float32) - source).mean() < 12
