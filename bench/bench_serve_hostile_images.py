"""Issue 22, item 5: two requests of huge PNGs, abandoned, against one small image request.

Each hostile request carries ``--huge`` PNGs of ``--side`` x ``--side`` pixels (all black, so a
39.7-megapixel PNG is ~120 KB), is sent over a raw socket and abandoned (the socket closed) after
``--leave-after`` seconds. A moment after both are sent, one 40x40 PNG request is sent; its latency
is the first number. The second is how long the server kept burning CPU after both clients had gone
(its process CPU time, sampled every 50 ms, until it grows by less than 5% of a core over 0.5 s).

The real server (a subprocess on 127.0.0.1, an ephemeral port) with the tiny random test model, so
the time is all image decoding. Extra arguments after ``--`` go to ``altclip-fast serve``::

    python bench/bench_serve_hostile_images.py
    python bench/bench_serve_hostile_images.py -- --max-request-pixels 400000000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def png(side: int, value: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def body(images: list[bytes]) -> bytes:
    items = [base64.b64encode(raw).decode() for raw in images]
    return json.dumps({"input": items, "modality": "image"}).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model), "--device", "cpu",
               "--dtype", "fp32", "--host", "127.0.0.1", "--port", "0", *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stderr:
        if "listening on http://" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, line.split("listening on ")[1].split()[0]
    raise SystemExit(f"the server did not start ({command})")


def abandon(host: str, port: int, payload: bytes, leave_after: float, answers: list) -> None:
    """POST ``payload``, wait ``leave_after`` seconds for an answer, then close the socket."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock.settimeout(leave_after)
        try:
            answers.append(sock.recv(200).split(b"\r\n", 1)[0].decode())
        except socket.timeout:
            answers.append("abandoned")


def post_timed(url: str, payload: bytes) -> tuple[int, float]:
    import httpx

    start = time.monotonic()
    r = httpx.post(url + "/v1/embeddings", content=payload, timeout=600)
    return r.status_code, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=6300, help="huge PNG side (default 6300: 39.7 MP)")
    parser.add_argument("--huge", type=int, default=8, help="huge PNGs per hostile request (default 8)")
    parser.add_argument("--leave-after", type=float, default=2.0)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_hostile"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]

    from tests.altclip_fast.processor_fixtures import make_model_dir

    model = Path(args.work_dir) / "tiny"
    if not (model / "config.json").is_file():
        make_model_dir(model)
    hostile = body([png(args.side, v) for v in range(args.huge)])
    small = body([png(40, 128)])
    print(f"hostile body: {len(hostile) / 1e6:.2f} MB, {args.huge} x {args.side}x{args.side} "
          f"({args.huge * args.side ** 2 / 1e6:.1f} MP); serve {' '.join(extra) or '(defaults)'}", flush=True)

    import httpx

    proc, url = start_server(model, extra)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        httpx.post(url + "/v1/embeddings", content=small, timeout=60).raise_for_status()  # warm
        samples = [(time.monotonic(), cpu_seconds(proc.pid))]
        answers: list = []
        clients = [threading.Thread(target=abandon, args=(host, int(port), hostile, args.leave_after, answers))
                   for _ in range(2)]
        for c in clients:
            c.start()
        small_s: list = []
        threading.Thread(target=lambda: (time.sleep(0.2), small_s.append(post_timed(url, small))), daemon=True).start()
        while time.monotonic() - samples[0][0] < 600:  # sample until the clients are done and the server idles
            time.sleep(0.05)
            samples.append((time.monotonic(), cpu_seconds(proc.pid)))
            old = [s for s in samples if s[0] <= samples[-1][0] - 0.5]
            if small_s and len(answers) == 2 and old and samples[-1][1] - old[-1][1] < 0.025:
                break
        left = samples[0][0] + args.leave_after
        busy_until = next(t for t, c in samples if c >= samples[-1][1] - 0.02)  # when it last grew
        after = samples[-1][1] - max((c for t, c in samples if t <= left), default=samples[0][1])
        status, seconds = small_s[0]
        print(f"small request: {status} in {seconds:.2f} s; hostile requests: {answers}")
        print(f"server CPU after both clients left: {after:.2f} s, busy until {max(0.0, busy_until - left):.2f} s "
              f"after they left; CPU in all: {samples[-1][1] - samples[0][1]:.2f} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
