"""``embed --out-dir --engine ray``: the local engine's shards from a local Ray (num_cpus=2, started
once for the module and shut down after), webdataset input and captioned image files with --with-text,
an actor killed mid-run, and ``embed_dataset``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.altclip_fast.apps.cli_helpers import cli_main, run_cli
from tests.altclip_fast.apps.embedding.collection_data import (
    CPU, metadata, shards, write_captioned_folder, write_collection,
)

pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_collection(tmp_path_factory.mktemp("collection_ray"))


@pytest.fixture(scope="module")
def local_ray():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # only a Ray that cannot start here skips these tests
        pytest.skip(f"a local Ray (num_cpus=2) cannot start here: {type(exc).__name__}: {exc}")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(work):
    assert cli_main("embed", "photos", "--out-dir", "ray_local", "--shard-size", 3, "--batch-size", 2, *CPU, cwd=work) == 0
    return work / "ray_local"


def _same(a, b):
    for kind in ("img", "text"):
        assert [p.shape for p in shards(a, kind)] == [p.shape for p in shards(b, kind)]
        for x, y in zip(shards(a, kind), shards(b, kind)):
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3)
    def parquets(out):
        return [p.relative_to(out) for p in sorted(out.glob("metadata/*.parquet"))] + [Path("skipped.parquet")]

    assert parquets(a) == parquets(b)
    for name in parquets(a):  # the same rows, types and order: the same bytes
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ray_engine_writes_the_local_engines_shards(work, local_ray, local_run):
    assert cli_main("embed", "photos", "--out-dir", "ray_two", "--shard-size", 3, "--batch-size", 2, "--engine", "ray",
                "--ray-workers", 2, *CPU, cwd=work) == 0
    _same(work / "ray_two", local_run)


def test_ray_actor_killed_mid_run_is_restarted(work, local_ray, local_run, monkeypatch, tmp_path):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("_ALTCLIP_FAST_RAY_KILL_ACTOR_ONCE", str(marker))
    assert cli_main("embed", "photos", "--out-dir", "ray_killed", "--shard-size", 3, "--batch-size", 2,
                "--engine", "ray", *CPU, cwd=work) == 0
    assert marker.exists()  # an actor did die
    _same(work / "ray_killed", local_run)  # every row exactly once, in order


def test_embed_dataset_api(work, local_ray, local_run):
    from altclip_fast.apps.embedding.ray_engine import embed_dataset

    paths = [m["image_path"] for m in metadata(local_run)]
    ds = ray.data.from_items([{"image": str(work / p)} for p in paths])
    out = embed_dataset(ds, str(work / "model"), batch_size=4).take_all()
    by_path = {r["image"]: r["embedding"] for r in out}  # Ray Data need not keep the order
    got = np.stack([by_path[str(work / p)] for p in paths])
    expected = np.concatenate(shards(local_run)).astype(np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_ray_driver_killed_mid_run_is_finished_by_resume(work, local_ray, local_run):
    # The driver runs in a process of its own, on this module's Ray, and is SIGKILLed after one shard.
    address = ray.get_runtime_context().gcs_address
    cmd = ["embed", "photos", "--out-dir", "ray_driver_killed", "--shard-size", 3, "--batch-size", 2,
           "--engine", "ray", "--ray-address", address, *CPU]
    proc = run_cli(*cmd, cwd=work, env={"_ALTCLIP_FAST_CRASH_AFTER_SHARDS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    out = work / "ray_driver_killed"
    assert not (out / "skipped.parquet").exists()
    written = {p.name for p in (out / "metadata").glob("*.parquet")}
    assert len(written) == 1  # the fault assembles one shard at a time, so the kill lands after the first
    # The actors had saved every batch before the driver died: --resume must take those part files,
    # not embed again. Altered on disk, their values must come through.
    parts = sorted((out / ".altclip-fast" / "parts").rglob("*.npz"))
    assert parts
    for path in parts:
        with np.load(path) as z:
            part = {name: z[name] for name in z.files}
        part["embedding"] = np.full_like(part["embedding"], 0.25)
        with open(path, "wb") as f:
            np.savez(f, **part)
    proc = run_cli(*cmd, "--resume", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shards reused" in proc.stdout and "0 shards reused" not in proc.stdout, proc.stdout
    for k, (got, want) in enumerate(zip(shards(out), shards(local_run))):
        if f"metadata_{k}.parquet" in written:
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
        else:
            assert got.shape == want.shape and (got == 0.25).all(), k
    for path in [*(Path("metadata", f"metadata_{k}.parquet") for k in range(3)), Path("skipped.parquet")]:
        assert (out / path).read_bytes() == (local_run / path).read_bytes(), path
    assert not list(out.rglob("*.tmp")) and not (out / ".altclip-fast" / "parts").exists()


def test_ray_engine_on_webdataset_with_text(work, local_ray, monkeypatch, capsys):
    # A corrupt member (s1), a sample without an image (s3) and a truncated tar (00002), in shards of
    # two that cross tars.
    pytest.importorskip("webdataset")
    cmd = ["embed", "wds/{00000..00002}.tar", "--with-text", "--shard-size", 2, "--batch-size", 2, *CPU]
    assert cli_main(*cmd, "--out-dir", "wds_local", cwd=work) == 0
    local_skips = sorted(line for line in capsys.readouterr().err.splitlines() if "altclip-fast: skipped" in line)
    assert len(local_skips) == 3

    def on_the_driver(*args):
        raise AssertionError("the driver read tar members")

    monkeypatch.setattr("altclip_fast.apps.embedding.inputs.tar_images", on_the_driver)  # Ray's workers do not see this
    assert cli_main(*cmd, "--out-dir", "wds_ray", "--engine", "ray", cwd=work) == 0
    _same(work / "wds_ray", work / "wds_local")
    ray_skips = sorted(line for line in capsys.readouterr().err.splitlines() if "altclip-fast: skipped" in line)
    assert ray_skips == local_skips  # the same lines on the console too, tar#key each
    import pyarrow.parquet as pq

    reasons = [r["reason"] for r in pq.read_table(work / "wds_ray" / "skipped.parquet").to_pylist()]
    assert len(reasons) == 3 and any("cannot decode" in r for r in reasons), reasons
    assert len(metadata(work / "wds_ray")) == sum(len(t) for t in shards(work / "wds_ray", "text")) == 5


def test_ray_engine_on_captioned_image_files_with_text(work, local_ray):
    write_captioned_folder(work)
    cmd = ["embed", "captioned", "--with-text", "--shard-size", 2, "--batch-size", 2, *CPU]
    assert cli_main(*cmd, "--out-dir", "ftxt_local", cwd=work) == 0
    assert cli_main(*cmd, "--out-dir", "ftxt_ray", "--engine", "ray", cwd=work) == 0
    _same(work / "ftxt_ray", work / "ftxt_local")
    assert len(metadata(work / "ftxt_ray")) == sum(len(t) for t in shards(work / "ftxt_ray", "text")) == 3
