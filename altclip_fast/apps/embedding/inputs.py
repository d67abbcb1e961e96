"""Every input kind -> one ``Listing``: a folder (recursive), a glob, an image file, a caption file
(one caption per line), or webdataset tar shards; with --with-text, image files are captioned by the
``.txt`` beside each (clip-retrieval's "files" input) and webdataset samples by their ``txt``.

The listing is made and sorted up front: input ``i`` is the ``i``-th of it whatever engine or writer
runs, and a resumed run is checked against it (``plan``).

- Symlinks: links to files are followed; links to folders are not (they are listed as skipped, as
  are broken and looping links), so a walk never loops. A file reached under several names is
  embedded once, under its first name in sorted order (a real name before a link); the others are
  listed as skipped. Glob patterns follow the same policy (they are matched here, not by ``glob``).
- One list of image extensions, ``IMAGE_EXTENSIONS``: files are taken by it, and so are webdataset
  members (a sample's image is its first member whose extension is in it).
- A webdataset read error (a truncated tar, a corrupt header) is recorded and ends that tar, never
  the run.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
MEMBER_EXTENSIONS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # webdataset member names: "jpg", ...
WEBDATASET_NEEDED = "webdataset input needs the webdataset package: pip install 'altclip-fast[collection]'"


@dataclass
class Listing:
    """Everything a run embeds, in output order.

    ``items[i]`` is how input ``i`` is read (a path, a caption, or ``(tar index, key)``); ``rows[i]``
    its metadata columns in the shards; ``identity[i]`` what it is (a resolved path, a caption line,
    a tar and key): the listing a resumed run must match. ``files`` are the files read (resolved image
    paths or tars) with their ``stats`` (``[size, mtime_ns]``); ``file_of[i]`` is input ``i``'s entry
    there (None: input ``i`` is ``files[i]``). ``skipped``: inputs left out while listing, each with a
    ``reason`` and either a ``path`` (and ``key``) or a caption file's ``line``.
    """

    modality: str  # "image" or "text"
    source: str  # "files", "captions" or "webdataset"
    items: list
    rows: list[dict]
    identity: list[str]
    skipped: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    stats: list[list[int]] = field(default_factory=list)
    file_of: list[int] | None = None
    texts: list[str] | None = None  # --with-text: the caption per image, row-aligned
    tars: list[str] = field(default_factory=list)  # webdataset: the tars as named
    spec: str = ""  # INPUT as given
    # The absolute folder the images were listed under (None for captions). ``image_path`` is absolute,
    # so a reader in any working directory finds the file; the server opens a row's image only when
    # its real path lies below this folder's real path (thumbnails).
    root: str | None = None

    def changed_since(self, files: list[str], stats: list[list[int]]) -> list[int]:
        """The inputs whose file is not in ``files`` at the same size and mtime."""
        before = dict(zip(files, (list(s) for s in stats)))
        changed = {j for j, (name, st) in enumerate(zip(self.files, self.stats)) if before.get(name) != list(st)}
        if self.file_of is None:
            return sorted(changed)
        return [i for i, j in enumerate(self.file_of) if j in changed]

    def skip_path(self, i: int) -> str:
        """How skipped.parquet names input ``i``: a webdataset sample by its tar (its key goes in ``key``,
        as the listing's own skipped rows do), any other input by its path or caption."""
        if self.source == "webdataset":
            return self.tars[self.items[i][0]]
        if self.source == "files":
            return self.items[i]  # as named, like the listing's own skipped paths
        return self.rows[i]["caption"]


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- files

def _name_matches(name: str, pattern: str) -> bool:
    # As glob: a leading dot is matched only by a pattern that starts with one.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _path_matches(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether the path components ``parts`` match the glob components ``pats`` (``**``: any depth)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return _path_matches(parts, pats[1:]) or (
            bool(parts) and not parts[0].startswith(".") and _path_matches(parts[1:], pats))
    return bool(parts) and _name_matches(parts[0], pats[0]) and _path_matches(parts[1:], pats[1:])


def _may_hold_matches(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether something below the folder ``parts`` could match ``pats``."""
    if not parts:
        return bool(pats)
    if not pats:
        return False
    if pats[0] == "**":
        return _may_hold_matches(parts, pats[1:]) or (
            not parts[0].startswith(".") and _may_hold_matches(parts[1:], pats))
    return _name_matches(parts[0], pats[0]) and _may_hold_matches(parts[1:], pats[1:])


def _split_glob(spec: str) -> tuple[str, tuple[str, ...]]:
    """``'photos/**/*.jpg'`` -> ``('photos', ('**', '*.jpg'))``: the folder to walk and the pattern below it."""
    parts = spec.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not _has_glob(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) if fixed else ""
    if spec.startswith(os.sep) and not root:
        root = os.sep
    return root, tuple(p for p in parts[fixed:] if p not in ("", "."))


def _scan_images(root: str, pats: tuple[str, ...] | None) -> tuple[list[tuple[str, bool, os.stat_result]], list[dict]]:
    """Walk ``root`` (every image below it, or those matching ``pats``) without following folder links.
    Returns ``(path, is_link, stat)`` per image file and the entries left out, with their reasons."""
    found, skipped = [], []
    stack = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"path": folder, "reason": f"cannot list folder: {exc.strerror or exc}",
                            "category": "unreadable folder"})
            continue
        subfolders = []
        for entry in entries:
            parts = (*rel, entry.name)
            path = os.path.join(folder, entry.name) if folder else entry.name
            wanted = is_image_name(entry.name) and (pats is None or _path_matches(parts, pats))
            try:
                is_link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=False):
                    if pats is None or _may_hold_matches(parts, pats):
                        subfolders.append((path, parts))
                    continue
                st = os.stat(path) if is_link else entry.stat(follow_symlinks=False)
            except OSError as exc:
                if wanted:
                    reason, category = (
                        ("broken symbolic link", "broken link") if exc.errno == errno.ENOENT else
                        ("symbolic link loop", "link loop") if exc.errno == errno.ELOOP else
                        (f"cannot stat: {exc.strerror or exc}", "unreadable"))
                    skipped.append({"path": path, "reason": reason, "category": category})
                continue
            if stat.S_ISDIR(st.st_mode):
                if pats is None or _may_hold_matches(parts, pats):
                    skipped.append({"path": path, "reason": "symbolic link to a folder (not followed)",
                                    "category": "folder link"})
            elif stat.S_ISREG(st.st_mode) and wanted:
                found.append((path, is_link, st))
        stack.extend(reversed(subfolders))
    return found, skipped


def _image_listing(found: list[tuple[str, bool, os.stat_result]], skipped: list[dict]) -> Listing:
    """One input per real file: the first of its names in sorted order, a real name before a link."""
    listing = Listing("image", "files", [], [], [], skipped)
    by_file: dict[tuple[int, int], list[tuple[bool, str, os.stat_result]]] = {}
    for path, is_link, st in found:
        by_file.setdefault((st.st_dev, st.st_ino), []).append((is_link, path, st))
    chosen = []
    for names in by_file.values():
        names.sort()
        _, path, st = names[0]
        chosen.append((path, st))
        for _, other, _ in names[1:]:
            listing.skipped.append({"path": other, "reason": f"same file as {path}", "category": "duplicate"})
    for i, (path, st) in enumerate(sorted(chosen)):
        listing.items.append(path)
        listing.rows.append({"image_path": os.path.abspath(path), "key": f"{i:09d}"})
        listing.identity.append(os.path.realpath(path))
        listing.stats.append([st.st_size, st.st_mtime_ns])
    listing.files = listing.identity
    listing.skipped.sort(key=lambda s: s["path"])
    return listing


def read_caption_lines(path: Path) -> list[str]:
    """Lines end at ``\\n`` or ``\\r\\n`` only (not at U+2028, U+0085, form feeds or a lone ``\\r``,
    which ``str.splitlines`` also splits at), and a UTF-8 byte order mark is not part of the text."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _caption_listing(spec: str, path: Path) -> Listing:
    try:
        lines = read_caption_lines(path)
    except UnicodeDecodeError:
        raise UsageError(f"{spec}: not UTF-8 text (expected an image folder, a glob, or one caption per line)") from None
    listing = Listing("text", "captions", [], [], [])
    for number, line in enumerate(lines, start=1):
        if line.strip():
            listing.items.append(line)
            listing.rows.append({"caption": line, "key": f"{number:09d}", "line": number})
            listing.identity.append(json.dumps({"line": number, "text": line}, ensure_ascii=False))
        else:
            listing.skipped.append({"line": number, "reason": "blank line"})
    if not listing.items:
        raise UsageError(f"{spec}: no captions (the file has no non-blank lines)")
    return listing


def _read_caption(path: str) -> tuple[str | None, list[int] | None, str | None]:
    """``(caption, [size, mtime_ns], None)`` for an image's caption file, or ``(None, None, reason)``."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None, None, "no txt caption (--with-text)"
    except OSError as exc:
        return None, None, f"cannot read its txt caption: {exc.strerror or exc}"
    return raw.decode("utf-8", "replace").strip(), [st.st_size, st.st_mtime_ns], None


def with_captions(images: Listing) -> Listing:
    """--with-text on image files (clip-retrieval's "files" input): each image's caption is the ``.txt``
    beside it (``a/b.jpg`` -> ``a/b.txt``), read as a webdataset ``txt`` member is; an image without
    one is skipped, as a sample without ``txt`` is. A caption file's size and mtime join its image's
    ``stats``, so that ``--resume`` computes an input again when either changed."""
    listing = Listing("image", "files", [], [], [], list(images.skipped), texts=[])
    for path, row, st in zip(images.items, images.rows, images.stats):
        caption, caption_st, reason = _read_caption(os.path.splitext(path)[0] + ".txt")
        if caption is None:
            listing.skipped.append({"path": path, "reason": reason, "category": "no caption"})
            continue
        listing.items.append(path)
        listing.rows.append({"image_path": os.path.abspath(path), "key": f"{len(listing.rows):09d}", "caption": caption})
        listing.identity.append(os.path.realpath(path))
        listing.stats.append([*st, *caption_st])
        listing.texts.append(caption)
    listing.files = listing.identity
    listing.skipped.sort(key=lambda s: s["path"])
    listing.root = images.root
    return listing


def find_inputs(spec: str) -> Listing:
    """A folder (recursive), a glob, an image file, or a text file with one caption per line."""
    path = Path(spec).expanduser()
    if not path.exists() and _has_glob(spec):
        root, pats = _split_glob(os.path.expanduser(spec))
        listing = _image_listing(*_scan_images(root, pats))
        if not listing.items:
            raise UsageError(f"{spec}: no image files match this pattern")
        listing.root = os.path.abspath(root or ".")
        return listing
    if not path.exists():
        raise UsageError(f"{spec}: no such file or directory")
    if path.is_dir():
        listing = _image_listing(*_scan_images(str(path), None))
        if not listing.items:
            raise UsageError(
                f"{spec}: no images found in this folder or below (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        listing.root = os.path.abspath(path)
        return listing
    if is_image_name(path.name):
        listing = _image_listing([(str(path), False, path.stat())], [])
        listing.root = os.path.dirname(os.path.abspath(path))
        return listing
    return _caption_listing(spec, path)


def list_inputs(spec: str, *, webdataset: bool = True, with_text: bool = False) -> Listing:
    """INPUT -> its listing. ``webdataset``: whether tar shards are taken (the sharded writer's input)."""
    tars = webdataset_tars(spec) if webdataset else None
    if tars is not None:
        listing = list_webdataset(tars, with_text)
        if not listing.items:
            raise UsageError(f"{spec}: no sample in these tar files has an image")
    else:
        listing = find_inputs(spec)
        if with_text:
            if listing.source != "files":
                raise UsageError("--with-text needs webdataset input (tar shards whose samples carry a txt caption) "
                                 "or image files with a caption beside each (a/b.jpg and a/b.txt)")
            listing = with_captions(listing)
            if not listing.items:
                raise UsageError(f"{spec}: no image has a caption beside it (a/b.txt for a/b.jpg; --with-text)")
    listing.spec = spec
    return listing


# ---------------------------------------------------------------------------------------------- webdataset


def _expand_braces(spec: str) -> list[str]:
    from braceexpand import braceexpand  # installed with webdataset

    return list(braceexpand(spec))


def webdataset_tars(spec: str) -> list[str] | None:
    """The tar shards INPUT names (a brace pattern, a glob or a folder of .tar files), or None when
    INPUT is not webdataset."""
    path = Path(spec).expanduser()
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        return tars or None
    if path.is_file():
        return [str(path)] if spec.endswith(".tar") else None
    if not spec.endswith(".tar"):
        return None
    if "{" in spec and ".." in spec:
        try:
            names = _expand_braces(os.path.expanduser(spec))
        except ImportError:
            raise UsageError(WEBDATASET_NEEDED) from None
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise UsageError(f"{spec}: {len(missing)} of its {len(names)} tar files do not exist (e.g. {missing[0]})")
        return names
    names = sorted(glob.glob(os.path.expanduser(spec)))
    if not names:
        raise UsageError(f"{spec}: no tar files match this pattern")
    return names


def _wds_samples(tar: str, errors: list[dict]) -> Iterator[dict]:
    """The samples of one tar, through the webdataset library; a read error is recorded in ``errors``
    and ends this tar, never the run."""
    try:
        from webdataset.tariterators import group_by_keys, tar_file_iterator
    except ImportError:
        raise UsageError(WEBDATASET_NEEDED) from None

    def record(exc: Exception) -> bool:
        message = str(exc).split(" @ <", 1)[0]  # webdataset appends its file object's repr
        errors.append({"path": tar, "key": None, "reason": f"unreadable tar: {type(exc).__name__}: {message}"})
        return False  # stop this tar: after a bad header nothing further can be trusted

    try:
        with open(tar, "rb") as f:
            files = (dict(member, __url__=tar) for member in tar_file_iterator(f, handler=record))
            yield from group_by_keys(files, handler=record)
    except Exception as exc:  # raised while the tar stream advances (outside webdataset's handler)
        record(exc)


def _image_member(sample: dict) -> str | None:
    for ext in MEMBER_EXTENSIONS:
        if ext in sample:
            return ext
    return None


def _json_fields(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, ensure_ascii=False))
            for k, v in value.items() if k not in ("image_path", "key", "caption")}


def list_webdataset(tars: list[str], with_text: bool) -> Listing:
    listing = Listing("image", "webdataset", [], [], [], texts=[] if with_text else None, tars=tars, file_of=[],
                      root=os.path.commonpath([os.path.dirname(os.path.abspath(t)) for t in tars]))
    no_image = f"no image member ({', '.join(MEMBER_EXTENSIONS)})"
    for t, tar in enumerate(tars):
        st = os.stat(tar)
        listing.files.append(os.path.realpath(tar))
        listing.stats.append([st.st_size, st.st_mtime_ns])
        errors: list[dict] = []
        for sample in _wds_samples(tar, errors):
            key = sample.get("__key__")
            ext = _image_member(sample)
            caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None
            if ext is None:
                listing.skipped.append({"path": tar, "key": key, "reason": no_image})
                continue
            if with_text and caption is None:
                listing.skipped.append({"path": tar, "key": key, "reason": "no txt caption (--with-text)"})
                continue
            row = {"image_path": f"{os.path.abspath(tar)}/{key}.{ext}", "key": key}
            if caption is not None:
                row["caption"] = caption
            row.update(_json_fields(sample.get("json")))
            listing.items.append((t, key))
            listing.rows.append(row)
            listing.identity.append(f"{listing.files[t]}\t{key}")
            listing.file_of.append(t)
            if with_text:
                listing.texts.append(caption)
        listing.skipped.extend(errors)
    return listing


def tar_images(tar: str, wanted: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    """``(index, image bytes)`` for one tar's wanted samples (``{key: index}``), in the tar's order.
    Both engines read members here, so that they see the same samples."""
    for sample in _wds_samples(tar, []):
        i = wanted.get(sample.get("__key__"))
        if i is not None:
            yield i, sample[_image_member(sample)]


def webdataset_bytes(listing: Listing, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """``(index, image bytes)`` for the wanted inputs, in listing order, reading each tar once."""
    by_tar: dict[int, dict[str, int]] = {}
    for i in sorted(wanted):
        t, key = listing.items[i]
        by_tar.setdefault(t, {})[key] = i
    for t, keys in sorted(by_tar.items()):
        yield from tar_images(listing.tars[t], keys)
