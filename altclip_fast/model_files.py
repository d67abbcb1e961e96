"""Finding a model directory and reading its JSON files. Needs no torch, so the command line can check
a user's paths before torch is imported.

- ``resolve_model_dir``: a local directory, or a Hugging Face Hub id through huggingface_hub.
- ``find_weights``: the weights file of a model directory, in order of preference.
- ``read_json``: one JSON reader for every file of a model directory, with one-line errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from . import environment
from .errors import AltCLIPError, CheckpointError

__all__ = ["WEIGHTS_FILES", "resolve_model_dir", "find_weights", "read_json"]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# In order of preference: safetensors cannot run code and loads without a copy.
WEIGHTS_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)

# What a model directory may hold besides weights: configs, tokenizer and processor files.
_HUB_SMALL_FILES = ["*.json", "*.model", "*.txt"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(path_or_id: str | os.PathLike, *, subfolder: str = "", **hub_options) -> Path:
    """Return a local directory holding the checkpoint ``path_or_id`` (its ``subfolder``, if given).

    An existing directory is used as it is. Anything else that looks like a hub id (``org/name``)
    is fetched with huggingface_hub, which honours its cache and ``HF_HUB_OFFLINE``. Only
    safetensors weights are fetched when the repository has them; ``pytorch_model.bin`` otherwise.
    ``hub_options`` (``revision``, ``cache_dir``, ``local_files_only``, ``token``,
    ``force_download``) go to ``huggingface_hub.snapshot_download``; a local directory ignores them,
    as transformers does.
    """
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        if subfolder:
            path = path / subfolder
            if not path.is_dir():
                raise CheckpointError(f"{text}: no subfolder {subfolder!r}")
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; expected a model directory (with config.json and weights)")
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or text.count("/") > 1
    if looks_like_path or not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such directory")
    return _download_from_hub(text, subfolder=subfolder, **hub_options)


def _download_from_hub(repo_id: str, *, subfolder: str = "", **hub_options) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and fetching it from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'altclip-fast[hub]' (or pass a local directory)"
        ) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        local = Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[prefix + p for p in _HUB_SMALL_FILES + ["*.safetensors"]], **hub_options
        )) / prefix
        if find_weights(local) is None:
            local = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=[prefix + "pytorch_model*.bin"], **hub_options
            )) / prefix
    except Exception as exc:  # huggingface_hub raises many types: network, auth, offline cache miss
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = environment.get("HF_HUB_OFFLINE").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE is set and the hub cache has no copy of it"
            if offline
            else "without network access, set HF_HUB_OFFLINE=1 to use a copy already in the hub cache"
        )
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}). "
            f"Pass a local directory that holds config.json and the weights instead; {hint}"
        ) from None
    return local


def find_weights(model_dir: str | os.PathLike) -> Path | None:
    """The weights file (or index) ``read_state_dict`` would read, or None."""
    for name in WEIGHTS_FILES:
        candidate = Path(model_dir) / name
        if candidate.is_file():
            return candidate
    return None


def read_json(
    path: str | os.PathLike, *, error: type[AltCLIPError] = AltCLIPError, missing: Any = ..., what: str = "a JSON object"
) -> Any:
    """The JSON object in ``path``. A missing file returns ``missing`` when given, else raises ``error``;
    malformed JSON, or a top-level value that is not an object, raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        if missing is not ...:
            return missing
        raise error(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold {what}, got {type(data).__name__}")
    return data
