"""The collection the ``--out-dir`` tests embed, and how they read what was written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from tests.altclip_fast.processor_fixtures import make_model_dir, photo_like

CPU = ["--model", "model", "--device", "cpu", "--dtype", "fp32", "--workers", "0", "--no-progress"]


def _jpeg(w, h, seed) -> bytes:
    buf = io.BytesIO()
    photo_like(w, h, seed=seed).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_collection(root: Path) -> Path:
    """``root`` with a model, a photo folder (one broken file), a caption file and three webdataset tars
    (a corrupt member, a caption without an image, a tar truncated inside its second sample)."""
    make_model_dir(root / "model")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (30, 40), (33, 33), (50, 31), (31, 50), (44, 36)]):
        photo_like(w, h, seed=i).save((photos if i < 3 else photos / "sub") / f"img{i}.png")
    (photos / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "captions.txt").write_text("a cat\na dog\n\nun chat\n一只狗\n", encoding="utf-8")
    wds = root / "wds"
    wds.mkdir()
    _tar(wds / "00000.tar", [
        ("s0.jpg", _jpeg(40, 30, 10)), ("s0.txt", b"a cat"), ("s0.json", b'{"width": 40, "source": "x"}'),
        ("s1.jpg", b"corrupt bytes"), ("s1.txt", b"a dog"),
        ("s2.png", (lambda b: (photo_like(30, 40, seed=11).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())),
        ("s2.txt", "un chat".encode()),
        ("s3.txt", b"caption without an image"),
    ])
    _tar(wds / "00001.tar", [("t0.jpg", _jpeg(33, 33, 12)), ("t0.txt", b"ein Hund"), ("t1.jpg", _jpeg(36, 30, 13)),
                             ("t1.txt", b"a red car")])
    whole = (wds / "00001.tar").read_bytes()
    cut = whole.index(b"t1.jpg") + 512 + 100  # t1.jpg's header and part of its data
    (wds / "00002.tar").write_bytes(whole[:cut])  # truncated inside its second sample
    return root


def shards(out: Path, kind: str = "img") -> list[np.ndarray]:
    return [np.load(p) for p in sorted((out / f"{kind}_emb").glob("*.npy"))]


def metadata(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for p in sorted((out / "metadata").glob("*.parquet")) for row in pq.read_table(p).to_pylist()]


CAPTIONED = {"img0.png": "a cat", "img3.png": "一只狗", "sub/img1.jpg": "ein Hund", "broken.jpg": "never embedded"}


def write_captioned_folder(root: Path) -> Path:
    """``root/captioned``: clip-retrieval's "files" input, each image with its caption beside it
    (``CAPTIONED``), plus an image without a caption (``sub/img2.png``) and a broken one with its caption."""
    folder = root / "captioned"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["img0.png", "sub/img1.jpg", "sub/img2.png", "img3.png"]):
        photo_like(36 + i, 30, seed=20 + i).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    for name, caption in CAPTIONED.items():
        (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder
