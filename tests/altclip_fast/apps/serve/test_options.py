"""ServeOptions alone: the argparse flags it generates, and the checks ``from_args`` makes."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from altclip_fast.apps.serve.options import (
    API_KEY_ENV, Listen, ServeOptions, add_arguments, cli_default, flag_fields,
)
from altclip_fast.errors import UsageError

# The serve flags as they were written by hand before they were generated: (flag, dest, default, type, help).
BEFORE = [
    ("--host", "host", "127.0.0.1", None, "address to bind (default: 127.0.0.1, this machine only)"),
    ("--port", "port", 8000, int, "port (default: 8000; 0 picks a free one)"),
    ("--api-key", "api_key", None, None,
     f"require Authorization: Bearer KEY on every route but /health (or set {API_KEY_ENV})"),
    ("--served-model-name", "served_model_name", None, None,
     "the model id /v1/models lists (default: the --model folder's name, or the hub id)"),
    ("--max-batch-tokens", "max_batch_tokens", 8192, int, "real tokens per text batch (default: 8192)"),
    ("--max-batch-images", "max_batch_images", 32, int, "images per batch (default: 32)"),
    ("--max-wait-ms", "max_wait_ms", 5.0, float, "longest wait for a batch to fill (default: 5)"),
    ("--max-queue", "max_queue", 1024, int, "queued items before answering 429 (default: 1024)"),
    # Issue 22: 4 MiB (was 32) and 1024 items (was 2048, more than the default queue holds).
    ("--max-request-bytes", "max_request_bytes", 4 * 1024 * 1024, int,
     "largest request body, else 413 (default: 4 MiB: room for a few photos in base64, which is 4/3 of the file; "
     "the whole body is read and parsed before any field is checked, so a larger limit costs memory and parse "
     "time per request)"),
    ("--max-request-items", "max_request_items", 1024, int,
     "inputs per request, else 413; keep it at most --max-queue, which must hold a whole request (default: 1024)"),
    ("--max-classify-pairs", "max_classify_pairs", 65536, int,
     "images x labels per /v1/classify request, else 413: the answer holds one probability per pair "
     "(default: 65536)"),
    ("--label-cache", "label_cache_size", 4096, int,
     "classification label rows kept for reuse, least recently used out first; 0 keeps none (default: 4096)"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="some/model")
    add_arguments(parser)
    return parser


def _actions(parser):
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}


def test_the_generated_flags_are_the_hand_written_ones():
    parser = _parser()
    actions = _actions(parser)
    for flag, dest, default, kind, help_text in BEFORE:
        action = actions[flag]
        assert (action.dest, action.default, action.type, action.help) == (dest, default, kind, help_text), flag
    workers = actions["--preprocess-workers"]
    assert workers.help == "threads that tokenize and decode images (default: up to 4)" and workers.type is int
    assert 1 <= workers.default <= 4
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in parser._action_groups}
    assert groups["server"] == ["--host", "--port", "--api-key", "--served-model-name"]
    assert groups["batching and limits"] == [f for f, *_ in BEFORE[4:]] + ["--preprocess-workers", "--threads",
                                                                           "--max-request-pixels"]
    threads = actions["--threads"]
    assert (threads.dest, threads.default, threads.type) == ("threads", 0, int)
    assert groups["connections and hosts"] == ["--allow-host", "--max-connections", "--timeout-keep-alive",
                                               "--timeout-header", "--timeout-body", "--timeout-graceful-shutdown",
                                               "--cors-allow-origin"]
    assert groups["search service"] == ["--collection", "--faiss", "--thumbnail-size", "--thumbnail-cache-mb"]
    cors = actions["--cors-allow-origin"]
    assert (cors.dest, cors.default, cors.metavar) == ("cors_allow_origins", None, "ORIGIN")
    assert _parser().parse_args(["--cors-allow-origin", "*", "--cors-allow-origin", "http://a:1"]
                                ).cors_allow_origins == ["*", "http://a:1"]
    collection = actions["--collection"]
    assert (collection.dest, collection.default, collection.metavar) == ("collections", None, "COLLECTION")
    assert _parser().parse_args(["--collection", "a=x", "--collection", "b=y"]).collections == ["a=x", "b=y"]
    assert collection.help == (
        "NAME=DIR: serve the collection embed --out-dir wrote in DIR under NAME, searched by /v1/search and "
        "clip-retrieval's /knn-service, /metadata and /indices-list (repeatable; none: no search routes)")


def test_the_argparse_defaults_and_help_are_the_dataclass_fields():
    defaults, actions = ServeOptions(), _actions(_parser())
    for f in flag_fields(ServeOptions) + flag_fields(Listen):
        action = actions[f.metadata["flag"]]
        assert action.help == f.metadata["help"]
        assert action.default == cli_default(f)
        if "cli_default" not in f.metadata and f.name in {g.name for g in fields(ServeOptions)}:
            assert action.default == getattr(defaults, f.name), f.name
    assert Listen() == Listen.from_args(_parser().parse_args([]))


def test_a_request_of_the_default_most_items_fits_the_default_queue():
    """Else requests of max_queue + 1 .. max_request_items items pass one limit and fail the other."""
    defaults = ServeOptions()
    assert defaults.max_request_items <= defaults.max_queue


def test_from_args_fills_the_options():
    args = _parser().parse_args(["--max-queue", "7", "--max-wait-ms", "0", "--label-cache", "0"])
    options = ServeOptions.from_args(args, health_ttl_s=0)
    assert (options.max_queue, options.max_wait_ms, options.label_cache_size) == (7, 0.0, 0)
    assert options.model_name == "some/model"  # --served-model-name defaults to --model
    assert options.health_ttl_s == 0 and options.api_key is None
    named = ServeOptions.from_args(_parser().parse_args(["--served-model-name", "mine"]))
    assert named.model_name == "mine"


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeOptions.from_args(_parser().parse_args([])).api_key == "from-env"
    assert ServeOptions.from_args(_parser().parse_args(["--api-key", "flag"])).api_key == "flag"
    monkeypatch.setenv(API_KEY_ENV, " ")
    assert ServeOptions.from_args(_parser().parse_args([])).api_key is None


@pytest.mark.parametrize("argv,message", [
    (["--max-queue", "0"], "--max-queue must be at least 1, got 0"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens must be at least 1, got 0"),
    (["--max-batch-images", "-3"], "--max-batch-images must be at least 1, got -3"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be at least 1, got 0"),
    (["--max-request-items", "0"], "--max-request-items must be at least 1, got 0"),
    (["--max-classify-pairs", "0"], "--max-classify-pairs must be at least 1, got 0"),
    (["--preprocess-workers", "0"], "--preprocess-workers must be at least 1, got 0"),
    (["--max-request-pixels", "0"], "--max-request-pixels must be at least 1, got 0"),
    (["--max-wait-ms", "-1"], "--max-wait-ms must be at least 0, got -1.0"),
    (["--label-cache", "-1"], "--label-cache must be at least 0, got -1"),
    (["--threads", "-1"], "--threads must be at least 0, got -1"),
    (["--thumbnail-size", "-1"], "--thumbnail-size must be at least 0, got -1"),
    (["--thumbnail-cache-mb", "-5"], "--thumbnail-cache-mb must be at least 0, got -5"),
    (["--cors-allow-origin", "http://127.0.0.1:3005/"],
     "--cors-allow-origin takes * or scheme://host[:port] (as a browser sends Origin), got 'http://127.0.0.1:3005/'"),
    (["--cors-allow-origin", "127.0.0.1:3005"],
     "--cors-allow-origin takes * or scheme://host[:port] (as a browser sends Origin), got '127.0.0.1:3005'"),
    # Several bad: the first as the hand-written checks ran them (the minimum-1 flags, then the others).
    (["--max-wait-ms", "-1", "--label-cache", "-1", "--max-queue", "0"], "--max-queue must be at least 1, got 0"),
    (["--label-cache", "-1", "--max-wait-ms", "-1"], "--max-wait-ms must be at least 0, got -1.0"),
    (["--preprocess-workers", "0", "--max-request-items", "0"], "--max-request-items must be at least 1, got 0"),
])
def test_bad_values_are_refused_with_the_flag_named(argv, message):
    with pytest.raises(UsageError) as caught:
        ServeOptions.from_args(_parser().parse_args(argv))
    assert str(caught.value) == message


@pytest.mark.parametrize("key", ["", " ", "\t"])
def test_an_empty_api_key_is_refused_rather_than_turning_auth_off(monkeypatch, key):
    monkeypatch.setenv(API_KEY_ENV, "from-env")  # not even the environment's key stands in for it
    with pytest.raises(UsageError) as caught:
        ServeOptions.from_args(_parser().parse_args(["--api-key", key]))
    assert str(caught.value).startswith("--api-key is empty") and API_KEY_ENV in str(caught.value)


def test_the_served_model_name_is_the_folder_not_its_path(tmp_path):
    model = tmp_path / "my-altclip"
    model.mkdir()
    for given in (str(model), str(model) + "/", f"{model}/../my-altclip"):
        assert ServeOptions.from_args(_parser().parse_args(["--model", given])).model_name == "my-altclip"
    assert ServeOptions.from_args(_parser().parse_args(["--model", "BAAI/AltCLIP"])).model_name == "BAAI/AltCLIP"


def test_allow_host_repeats_and_the_connection_limits_parse():
    args = _parser().parse_args(["--allow-host", "a.internal", "--allow-host", "b.internal", "--max-connections", "9",
                                 "--timeout-body", "2.5"])
    options = ServeOptions.from_args(args)
    assert options.allow_hosts == ("a.internal", "b.internal") and ServeOptions.from_args(
        _parser().parse_args([])).allow_hosts == ()
    assert (options.max_connections, options.timeout_body_s, options.timeout_header_s) == (9, 2.5, 10.0)
    with pytest.raises(UsageError, match="--timeout-header must be at least 0.1, got 0.0"):
        ServeOptions.from_args(_parser().parse_args(["--timeout-header", "0"]))


def test_cors_origins_and_thumbnail_settings_parse():
    options = ServeOptions.from_args(_parser().parse_args(
        ["--cors-allow-origin", "http://127.0.0.1:3005", "--cors-allow-origin", "*", "--thumbnail-size", "0",
         "--thumbnail-cache-mb", "8"]))
    assert options.cors_allow_origins == ("http://127.0.0.1:3005", "*")
    assert (options.thumbnail_size, options.thumbnail_cache_mb) == (0, 8)
    plain = ServeOptions.from_args(_parser().parse_args([]))
    assert plain.cors_allow_origins == () and plain.thumbnail_size > 0 and plain.thumbnail_cache_mb > 0


def test_collection_repeats_as_name_dir_pairs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = _parser().parse_args(["--collection", f"one={tmp_path / 'a'}", "--collection", f"two={tmp_path / 'b'}"])
    assert ServeOptions.from_args(args).collections == (("one", str(tmp_path / "a")), ("two", str(tmp_path / "b")))
    assert ServeOptions.from_args(_parser().parse_args([])).collections == ()


@pytest.mark.parametrize("values,message", [
    (["nodir"], "--collection takes NAME=DIR, got 'nodir'"),
    (["=DIR"], "--collection takes NAME=DIR, got '=DIR'"),
    (["name="], "--collection takes NAME=DIR, got 'name='"),
    (["x=MISSING"], "--collection x=MISSING: no such directory"),
    (["x=HERE", "x=HERE"], "--collection 'x' is given twice"),
])
def test_bad_collections_are_one_line_usage_errors(tmp_path, values, message):
    argv = [a for v in values for a in ("--collection", v.replace("HERE", str(tmp_path)).replace(
        "MISSING", str(tmp_path / "missing")))]
    with pytest.raises(UsageError) as caught:
        ServeOptions.from_args(_parser().parse_args(argv))
    assert str(caught.value) == message.replace("MISSING", str(tmp_path / "missing"))


def test_faiss_takes_a_name_or_a_name_and_a_folder(tmp_path):
    args = _parser().parse_args(["--collection", f"one={tmp_path}", "--faiss", "one", "--faiss", "two=/x/idx"])
    assert ServeOptions.from_args(args).faiss == (("one", None), ("two", "/x/idx"))  # names checked on opening
    assert ServeOptions.from_args(_parser().parse_args([])).faiss == ()
    for values, message in ((["=x"], "--faiss takes NAME or NAME=FOLDER, got '=x'"),
                            (["a="], "--faiss takes NAME or NAME=FOLDER, got 'a='"),
                            (["a", "a=/y"], "--faiss 'a' is given twice")):
        with pytest.raises(UsageError) as caught:
            ServeOptions.from_args(_parser().parse_args([a for v in values for a in ("--faiss", v)]))
        assert str(caught.value) == message
