"""``altclip-fast serve`` as users run it: the CLI in a subprocess on 127.0.0.1 (an ephemeral port), with
a tiny random model. Only what needs a real process is here: the console lines, a real socket and the
openai client over TCP with the options the command line makes, SIGTERM, and a missing serve extra.
Each server is killed (its process group) at teardown.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

for _name in ("transformers", "starlette", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

import httpx  # noqa: E402

from tests.altclip_fast.apps.serve.helpers import KEY, embed  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
READY = re.compile(r"^altclip-fast serve: .+, listening on (http://127\.0\.0\.1:\d+) \((API key required|no API key)\)$")


class Server:
    """``altclip-fast serve`` in its own process group; ``url`` once it says it listens."""

    def __init__(self, model_dir: Path, *options: str, timeout: float = 120, slow_forward_ms: float = 0,
                 open_files: int | None = None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "_ALTCLIP_FAST_SLOW_FORWARD_MS": str(slow_forward_ms),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("ALTCLIP_FAST_API_KEY", None)
        command = [sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model_dir),
                   "--device", "cpu", "--dtype", "fp32", "--host", "127.0.0.1", "--port", "0", *options]
        def limit_files():  # in the child, before exec: as `ulimit -n open_files`
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, preexec_fn=limit_files if open_files else None)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"the server did not start: {''.join(self.log)[-3000:]}") from None
            if "listening on http://" in line:
                self.ready_line = line.rstrip("\n")
                self.url = line.split("listening on ")[1].split()[0]
                assert self.url.startswith("http://127.0.0.1:")
                return
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"the server exited: {''.join(self.log)[-3000:]}")

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def test_the_openai_client_works_unchanged(model_dir, direct):
    openai = pytest.importorskip("openai")
    server = Server(model_dir, "--api-key", KEY, "--max-batch-tokens", "64", "--max-wait-ms", "20")
    try:
        assert READY.match(server.ready_line).group(2) == "API key required", server.ready_line
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        texts = ["a photo of a dog", "фото собаки"]
        for fields in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
            result = client.embeddings.create(model="altclip", input=texts, **fields)
            for item, text in zip(result.data, texts):
                np.testing.assert_allclose(item.embedding, direct["text"](text), atol=2e-5)
            assert result.usage.prompt_tokens == sum(direct["tokens"](t) for t in texts)
        # --served-model-name defaults to the model folder's name: its path is not the client's business
        assert [m.id for m in client.models.list().data] == [model_dir.name]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="altclip", input="x")
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # no key needed
    finally:
        server.kill()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_threads_sets_the_forward_pass_threads(model_dir, direct, threads):
    """``--threads N``: the ready line says the torch thread count the model runs with, and it answers."""
    srv = Server(model_dir, "--threads", threads)
    try:
        assert READY.match(srv.ready_line) and f" with {threads} threads, listening on " in srv.ready_line, \
            srv.ready_line
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            r = embed(client, ["a photo of a cat"])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["text"]("a photo of a cat"), atol=2e-5)
    finally:
        srv.kill()


def test_sigterm_finishes_requests_in_flight_then_exits_0(model_dir, direct):
    srv = Server(model_dir, "--max-batch-tokens", "8", slow_forward_ms=500)
    try:
        assert READY.match(srv.ready_line).group(2) == "no API key", srv.ready_line
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
            texts = ["a photo of a cat", "ein foto", "un chat noir"]
            futures = [pool.submit(embed, client, [t]) for t in texts]
            time.sleep(0.3)  # all three accepted; at most one batch done
            srv.proc.send_signal(signal.SIGTERM)
            for future, text in zip(futures, texts):
                r = future.result(60)
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["text"](text), atol=2e-5)
        assert srv.proc.wait(60) == 0, "".join(srv.log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
        srv.reader.join(30)  # the whole of stderr has been read
        assert srv.log[-1] == "altclip-fast serve: stopped\n", srv.log
    finally:
        srv.kill()


def test_sigterm_does_not_wait_for_stalled_uploads_or_silent_clients(model_dir):
    srv = Server(model_dir)
    held = []
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        for i in range(30):  # 20 uploads that stall after 10 bytes, 10 connections that never send
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            if i < 20:
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
                             b"0123456789")
        time.sleep(0.5)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, "".join(srv.log)
        assert time.monotonic() - start < 10  # it was 62 s: the graceful timeout, waiting on the uploads
        srv.reader.join(30)
        assert srv.log[-1] == "altclip-fast serve: stopped\n" and "Traceback" not in "".join(srv.log), srv.log
    finally:
        for sock in held:
            sock.close()
        srv.kill()


def test_idle_connections_past_the_open_file_limit_get_503_then_time_out(model_dir):
    """With 256 open files and 300 idle connections, the server once timed every request out and logged
    a traceback per failed accept(); now the cap (lowered to fit) answers 503 and the idle ones go."""
    pytest.importorskip("resource")
    srv = Server(model_dir, "--timeout-keep-alive", "1", open_files=256)
    held = []
    try:
        assert re.search(r"--max-connections lowered from 1024 to \d+ to fit the open-file limit \(256\)",
                         "".join(srv.log)), srv.log
        port = int(srv.url.rsplit(":", 1)[1])
        for _ in range(300):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        start = time.monotonic()
        busy = httpx.get(srv.url + "/health", timeout=10)  # answered at once, 503 while the idle ones hold
        assert busy.status_code in (200, 503) and time.monotonic() - start < 5, busy.text
        time.sleep(2)  # past --timeout-keep-alive the idle ones are closed
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        for sock in held:  # each one was closed: at once with a 503 past the cap, or when idle too long
            sock.settimeout(5)
            reply = sock.recv(1 << 16)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 503 "), reply
        log = "".join(srv.log)
        assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
    finally:
        for sock in held:
            sock.close()
        srv.kill()


def test_a_taken_port_is_one_line_before_the_model_loads(model_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model_dir),
                               "--device", "cpu", "--port", str(port)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"altclip-fast: error: cannot listen on 127.0.0.1:{port} ("), lines


def test_an_empty_api_key_is_one_line_before_the_model_loads(model_dir):
    env = {**os.environ, "ALTCLIP_FAST_API_KEY": ""}  # as `--api-key "$KEY"` with KEY unset
    proc = subprocess.run([sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model_dir),
                           "--device", "cpu", "--port", "0", "--api-key", ""], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("altclip-fast: error: --api-key is empty"), lines


def test_without_the_serve_extra_serve_says_how_to_install(model_dir):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import altclip_fast\n"
        "from altclip_fast.apps.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(model_dir)!r}, '--device', 'cpu']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'altclip-fast[serve]'" in lines[0], proc.stderr
