"""``altclip-fast embed`` under faults: a full disk at each write site, an unwritable folder, a second
run on the same output, Ctrl-C, odd caption files, symlink loops, inputs typed differently or changed.

Faults are injected in process (``embedding.files.open`` is the one way the job opens files for
writing), on a tiny random checkpoint; kills, which need a process of their own, are in test_cli.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from altclip_fast.apps import cli
from altclip_fast.apps.embedding import encode, files
from altclip_fast.apps.embedding.inputs import find_inputs
from altclip_fast.apps.embedding.single_file import load_embeddings, published_mismatch
from altclip_fast.errors import AltCLIPError, UsageError
from tests.altclip_fast.apps.cli_helpers import cli_main, error_line
from tests.altclip_fast.processor_fixtures import make_model_dir, photo_like

pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers

CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    make_model_dir(root / "model")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (30, 40), (33, 33), (50, 31), (31, 50)]):
        photo_like(w, h, seed=i).save((photos if i < 3 else photos / "sub") / f"img{i}.png")
    (root / "captions.txt").write_text("a cat\na dog\nun chat\n一只狗\nein Hund\n", encoding="utf-8")
    return root


def interrupt_embedding_at(monkeypatch, call: int):
    """Ctrl-C during the ``call``-th model call from now on. Returns the real ``encode.encode``, to put back."""
    real, calls = encode.encode, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(encode, "encode", interrupting)
    return real


def leftovers(folder: Path) -> list[str]:
    """Temporary files anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


class _FullDiskFile:
    """A real file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_at(monkeypatch, fragment: str, after: int = 0) -> None:
    """Writes to files whose name contains ``fragment`` fail with ENOSPC, from the ``after``-th such file on."""
    seen = []

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode and fragment in Path(path).name:
            seen.append(path)
            if len(seen) > after:
                return _FullDiskFile(f)
        return f

    monkeypatch.setattr(files, "open", fake_open, raising=False)


# ---------------------------------------------------------------------------------------------- 1: a full disk


@pytest.mark.parametrize(
    "out,fragment,after,named,resumable",
    [
        ("c.npy", "plan.json", 0, "plan.json", False),
        ("c.npy", ".npz.", 1, "000000000002-000000000003.npz", True),  # the second batch's part file
        ("c.npy", ".c.npy.tmp", 0, "c.npy", True),  # the output itself
        ("c.safetensors", ".c.safetensors.tmp", 0, "c.safetensors", True),
        ("c.npy", ".c.npy.meta.json.tmp", 0, "c.npy.meta.json", True),
    ],
    ids=["plan", "batch", "npy-output", "safetensors-output", "meta"],
)
def test_a_full_disk_is_one_line_and_leaves_no_temp_files(work, tmp_path, monkeypatch, capsys,
                                                          out, fragment, after, named, resumable):
    target = tmp_path / out
    fill_disk_at(monkeypatch, fragment, after)
    code = cli_main("embed", "captions.txt", "--out", target, "--model", work / "model", "--batch-size", 2,
                *CPU_FP32, cwd=work)
    line = error_line(capsys)
    assert code == 1
    assert "no space left on device" in line and f"{named}:" in line
    assert ("--resume" in line) == resumable
    assert leftovers(tmp_path) == []
    assert (tmp_path / f".{out}.partial").exists() == resumable  # no half-started run to trip over
    assert not target.exists() and not Path(f"{target}.meta.json").exists()
    if resumable:
        monkeypatch.undo()
        assert cli_main("embed", "captions.txt", "--out", target, "--model", work / "model", "--batch-size", 2,
                    "--resume", *CPU_FP32, cwd=work) == 0
        embeddings, meta = load_embeddings(target, verify=True)
        assert embeddings.shape == (5, 12) and meta["count"] == 5
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out, f"{out}.meta.json"])


def test_the_output_is_written_without_a_memory_map(work, tmp_path, monkeypatch):
    """A memory-mapped page that a full tmpfs cannot back is a SIGBUS, not an error: no memmap at all."""

    def no_memmap(*args, **kwargs):
        raise AssertionError("open_memmap used")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_memmap)
    monkeypatch.setattr(np, "memmap", no_memmap)
    assert cli_main("embed", "captions.txt", "--out", tmp_path / "m.npy", "--model", "model", *CPU_FP32, cwd=work) == 0
    assert np.load(tmp_path / "m.npy").shape == (5, 12)


# ---------------------------------------------------------------------------------------------- 2: Ctrl-C, --overwrite


def test_ctrl_c_says_interrupted_once_and_overwrite_resume_keeps_the_batches(work, tmp_path, monkeypatch, capsys):
    target = tmp_path / "c.npy"
    cmd = ["embed", "captions.txt", "--out", target, "--model", "model", "--batch-size", 2, *CPU_FP32]
    assert cli_main(*cmd, cwd=work) == 0
    first = np.load(target)
    capsys.readouterr()

    real_embed = interrupt_embedding_at(monkeypatch, 2)
    assert cli_main(*cmd, "--overwrite", "--normalize", cwd=work) == 130
    err = capsys.readouterr().err
    assert err.count("interrupted") == 1, err
    assert "1 of 3 batches are saved" in err and "--resume" in err
    np.testing.assert_array_equal(np.load(target), first)  # the old output stands until the new one is done

    monkeypatch.setattr(encode, "encode", real_embed)
    # What the message says to run: the same command plus --resume. It must not discard the saved batch.
    assert cli_main(*cmd, "--overwrite", "--normalize", "--resume", cwd=work) == 0
    assert "2 reused from the interrupted run, 3 computed now" in capsys.readouterr().out
    embeddings, meta = load_embeddings(target)
    assert meta["normalized"] is True
    np.testing.assert_allclose(embeddings, first / np.linalg.norm(first, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_a_saved_partial_run_is_mentioned_and_a_mismatched_meta_is_detected(work, tmp_path, capsys):
    target = tmp_path / "c.npy"
    np.save(target, np.zeros((3, 12), np.float32))
    (tmp_path / ".c.npy.partial").mkdir()
    assert cli_main("embed", "captions.txt", "--out", target, "--model", "model", cwd=work) == 2
    line = error_line(capsys)
    assert "interrupted run" in line and "--resume" in line

    # A finished-looking output whose metadata belongs to another run is not "already complete".
    (tmp_path / ".c.npy.partial").rmdir()
    Path(f"{target}.meta.json").write_text(json.dumps({"output": "c.npy", "count": 2000, "rows": []}))
    assert "another output" in published_mismatch(target)
    assert cli_main("embed", "captions.txt", "--out", target, "--model", "model", "--resume", cwd=work) == 2
    assert "pass --overwrite" in error_line(capsys)
    with pytest.raises(AltCLIPError, match="another output"):
        load_embeddings(target)


# ---------------------------------------------------------------------------------------------- 3: caption files


def test_captions_split_only_at_newlines_and_lose_the_bom(tmp_path):
    path = tmp_path / "captions.txt"
    text = "\ufefffirst\u2028same line\r\nsecond\x85still\fsecond\rtoo\n\nthird\r\n"
    path.write_bytes(text.encode("utf-8"))
    inputs = find_inputs(str(path))
    assert inputs.items == ["first\u2028same line", "second\x85still\fsecond\rtoo", "third"]
    assert [r["line"] for r in inputs.rows] == [1, 2, 4]
    assert inputs.skipped == [{"line": 3, "reason": "blank line"}]
    # A last line without a newline is a line; a file of one newline has no captions.
    path.write_bytes(b"only")
    assert find_inputs(str(path)).items == ["only"]
    path.write_bytes(b"\n")
    with pytest.raises(UsageError, match="no captions"):
        find_inputs(str(path))


# ---------------------------------------------------------------------------------------------- 4: symlinks


@pytest.fixture
def linked(tmp_path) -> Path:
    """A folder with loops, a duplicate, a broken link, a looping file link and a linked folder."""
    root = tmp_path / "linked"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    photo_like(20, 20, seed=1).save(root / "a" / "one.png")
    photo_like(20, 20, seed=2).save(root / "a" / "deep" / "two.png")
    photo_like(20, 20, seed=3).save(root / "b" / "three.png")
    os.symlink("..", root / "a" / "deep" / "up")  # a loop
    os.symlink(".", root / "b" / "self")  # a second loop
    os.symlink("../b", root / "a" / "to_b")  # a folder reached twice
    os.symlink("one.png", root / "a" / "zz_again.png")  # the same file twice
    os.symlink("missing.png", root / "a" / "broken.png")
    os.symlink("loop2.png", root / "a" / "loop1.png")
    os.symlink("loop1.png", root / "a" / "loop2.png")
    return root


def _reasons(inputs) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in inputs.skipped}


@pytest.mark.parametrize("mode", ["folder", "glob"])
def test_symlinks_each_file_once_never_loop_and_list_what_is_left_out(linked, mode):
    spec = str(linked) if mode == "folder" else f"{linked}/**/*.png"
    inputs = find_inputs(spec)
    rel = [os.path.relpath(p, linked) for p in inputs.items]
    assert rel == ["a/deep/two.png", "a/one.png", "b/three.png"]
    assert len(set(inputs.identity)) == 3 and all(os.path.isabs(k) for k in inputs.identity)
    reasons = {os.path.relpath(p, linked): r for p, r in _reasons(inputs).items()}
    assert reasons["a/zz_again.png"].startswith("same file as") and reasons["a/zz_again.png"].endswith("a/one.png")
    assert reasons["a/broken.png"] == "broken symbolic link"
    assert reasons["a/loop1.png"] == reasons["a/loop2.png"] == "symbolic link loop"
    assert reasons["a/to_b"] == reasons["a/deep/up"] == reasons["b/self"] == "symbolic link to a folder (not followed)"


def test_glob_keeps_globs_matching_rules(tmp_path):
    (tmp_path / "p" / ".hidden").mkdir(parents=True)
    (tmp_path / "p" / "q").mkdir()
    for name in ("p/a.png", "p/q/b.png", "p/q/c.jpg", "p/.hidden/d.png", "p/.e.png"):
        photo_like(8, 8).save(tmp_path / name)
    found = lambda spec: [os.path.relpath(p, tmp_path) for p in find_inputs(str(tmp_path / spec)).items]
    assert found("p/**/*.png") == ["p/a.png", "p/q/b.png"]
    assert found("p/*.png") == ["p/a.png"]
    assert found("p/*/*") == ["p/q/b.png", "p/q/c.jpg"]
    assert found("p/.*.png") == ["p/.e.png"]


# ---------------------------------------------------------------------------------------------- 5: unwritable folder


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["permission", "read-only-fs"])
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(work, tmp_path, monkeypatch, capsys, code):
    def denied(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(code, os.strerror(code), str(path))
        return open(path, mode, *args, **kwargs)

    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if ".probe-" in str(path):  # as on a read-only file system: even a missing file cannot be removed
            raise OSError(code, os.strerror(code), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", denied, raising=False)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(cli, "Session", lambda args: pytest.fail("the model was loaded"))
    assert cli_main("embed", "captions.txt", "--out", tmp_path / "x.npy", "--model", "model", cwd=work) == 2
    line = error_line(capsys)
    assert "cannot write in the folder" in line and str(tmp_path) in line and os.strerror(code) in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_start_is_status_1(work, tmp_path, monkeypatch, capsys):
    fill_disk_at(monkeypatch, ".probe-")
    monkeypatch.setattr(cli, "Session", lambda args: pytest.fail("the model was loaded"))
    assert cli_main("embed", "captions.txt", "--out", tmp_path / "x.npy", "--model", "model", cwd=work) == 1
    assert "no space left on device" in error_line(capsys) and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(work, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert cli_main("embed", "captions.txt", "--out", folder / "x.npy", "--model", "model", cwd=work) == 2
        assert "cannot write in the folder" in error_line(capsys)
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------- 6: resume keys


def test_resume_is_keyed_on_resolved_paths_and_redoes_changed_files(work, tmp_path, monkeypatch, capsys):
    target = tmp_path / "p.npy"
    common = ["--out", target, "--model", work / "model", "--batch-size", 2, *CPU_FP32]
    real_embed = interrupt_embedding_at(monkeypatch, 3)
    assert cli_main("embed", "photos", *common, cwd=work) == 130  # batches 0 and 1 saved
    monkeypatch.setattr(encode, "encode", real_embed)
    capsys.readouterr()

    # Another directory, another spelling of the same folder: the same run. One file changed since.
    changed = work / "photos" / "img1.png"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert cli_main("embed", f"{work}/photos/../photos/", *common, "--resume", cwd=tmp_path) == 0
    finally:
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    captured = capsys.readouterr()
    assert "1 input files changed" in captured.err and "img1.png" in captured.err
    assert "2 reused from the interrupted run, 3 computed now" in captured.out  # batch 0 (img0, img1) redone

    # Other inputs: a sentence that says what differs, not a digest.
    assert cli_main("embed", "photos", *common, "--overwrite", cwd=work) == 0
    interrupt_embedding_at(monkeypatch, 3)
    assert cli_main("embed", "photos", *common, "--overwrite", cwd=work) == 130
    monkeypatch.setattr(encode, "encode", real_embed)
    capsys.readouterr()
    assert cli_main("embed", "photos/sub", *common, "--resume", cwd=work) == 2
    line = error_line(capsys)
    assert "not those of the interrupted run" in line and "no longer found" in line and "sha256" not in line


# ---------------------------------------------------------------------------------------------- 7: one run at a time


def test_a_second_run_on_the_same_output_is_refused(work, tmp_path, monkeypatch, capsys):
    import fcntl

    target = tmp_path / "c.npy"
    lock = tmp_path / ".c.npy.lock"
    with open(lock, "w") as held:
        held.write("12345\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(cli, "Session", lambda args: pytest.fail("the model was loaded"))
        assert cli_main("embed", "captions.txt", "--out", target, "--model", "model", "--overwrite", cwd=work) == 2
        line = error_line(capsys)
        assert "another altclip-fast embed (pid 12345) is writing" in line
    monkeypatch.undo()
    assert cli_main("embed", "captions.txt", "--out", target, "--model", "model", *CPU_FP32, cwd=work) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "c.npy.meta.json"]  # the lock file is gone
