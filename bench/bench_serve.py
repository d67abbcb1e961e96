"""``altclip-fast serve`` under load: throughput and p50/p99 latency with N concurrent clients.

Runs the real server (a subprocess on 127.0.0.1, an ephemeral port) twice in the same run: with
dynamic batching (the defaults) and with batching off (``--max-batch-images 1`` and
``--max-batch-tokens`` the length of one text), for short texts and for images. Each client sends
one item per request, back to back, a fixed number of times: every loop is bounded in count, and an
overall deadline stops a run that hangs. Before the load, one ``openai`` client sends ``--single-calls``
texts one after the other on one kept-open connection: the latency a lone client sees (p50, p99).

Each text load also reports where the CPU went, since the clients run on the server's cores: the
server's CPU seconds (its event loop's and its busiest threads', the model's first) and the seconds
those threads waited for a CPU that something else held, the clients' own CPU seconds (``--client
raw``: a kept-open ``http.client`` connection each, ~20x cheaper than httpx), and the text batches
the server formed (``/metrics``).

Without ``--model`` it writes a random checkpoint in BAAI/AltCLIP's full-size architecture (once, into
``--work-dir``) with a small test tokenizer, so nothing is downloaded::

    python bench/bench_serve.py --dtype bf16 --text-clients 32 --image-clients 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_checkpoint(directory: Path, arch: str) -> Path:
    if (directory / "config.json").is_file():
        return directory
    from altclip_fast.apps.benchmark import write_checkpoint, random_state_dict
    from altclip_fast.modeling.config import AltCLIPConfig
    from tests.altclip_fast.processor_fixtures import write_preprocessor_config, write_tokenizer_files
    from tests.checkpoints import tiny_config

    import torch

    directory.mkdir(parents=True, exist_ok=True)
    config = AltCLIPConfig() if arch == "baai" else tiny_config(vocab_size=250002, image_size=224, patch_size=14)
    write_checkpoint(config, random_state_dict(config), torch.bfloat16, str(directory))
    write_tokenizer_files(directory)
    size = config.vision_config.image_size
    write_preprocessor_config(directory, shortest_edge=size, crop=size)
    return directory


class Server:
    def __init__(self, model: Path, dtype: str, options: list[str], timeout: float = 600):
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "altclip_fast.apps.cli", "serve", "--model", str(model), "--device", "cpu",
                   "--dtype", dtype, "--host", "127.0.0.1", "--port", "0", *options]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        self.url = None
        for line in self.proc.stderr:
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.stop()
            raise SystemExit(f"the server did not start ({command})")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def server_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(seconds on a CPU, seconds runnable but waiting for one) of each thread of ``pid``, by thread id
    (the event loop's is ``pid``), from ``/proc/PID/task/TID/schedstat``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran, waited = (task / "schedstat").read_text().split()[:2]
        except (OSError, ValueError):  # the thread ended
            continue
        out[int(task.name)] = (int(ran) / 1e9, int(waited) / 1e9)
    return out


def batch_stats(url: str) -> tuple[float, float]:
    """(text batches run, text items in them) so far, from the server's /metrics."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for name in ("altclip_batch_items_count", "altclip_batch_items_sum"):
            if line.startswith(name + '{modality="text"}'):
                values[name] = float(line.split()[-1])
    return values.get("altclip_batch_items_count", 0.0), values.get("altclip_batch_items_sum", 0.0)


def measured(url: str, pid: int, run) -> dict:
    """``run()``'s result plus what it cost: the server's CPU seconds (the event loop's, the busiest
    other threads'), this process's (the clients'), the text batches formed and the load average."""
    before, batches = server_cpu(pid), batch_stats(url)
    mine = os.times()
    result = run()
    clients = os.times()
    after, batches_after = server_cpu(pid), batch_stats(url)
    spent = sorted((after[t][0] - before.get(t, (0.0, 0.0))[0], after[t][1] - before.get(t, (0.0, 0.0))[1], t)
                   for t in after)
    count, items = batches_after[0] - batches[0], batches_after[1] - batches[1]
    result.update({
        "server_cpu_s": round(sum(s for s, _, _ in spent), 2),
        "server_loop_cpu_s": round(next((s for s, _, t in spent if t == pid), 0.0), 2),
        # the busiest threads but the loop (the model's first): CPU seconds, and seconds spent runnable but
        # waiting for a CPU (other processes had it)
        "server_busiest_threads_cpu_s": [round(s, 2) for s, _, t in spent[::-1][:4] if t != pid],
        "server_busiest_threads_runqueue_s": [round(w, 2) for s, w, t in spent[::-1][:4] if t != pid],
        "client_cpu_s": round(clients.user + clients.system - mine.user - mine.system, 2),
        "text_batches": int(count), "mean_text_batch": round(items / count, 1) if count else None,
        "load_average_1min": os.getloadavg()[0]})
    return result


class RawClient:
    """A kept-open ``http.client`` connection: the least client CPU per request (the load's clients share
    the server's cores), against httpx's ~3x (``--client``)."""

    def __init__(self, url: str, timeout: float):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def post(self, path: str, body: dict) -> int:
        self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = self.connection.getresponse()
        reply.read()
        return reply.status

    def close(self):
        self.connection.close()


def load(url: str, clients: int, per_client: int, make_body, deadline_s: float, kind: str = "httpx") -> dict:
    import httpx

    latencies, errors = [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def client(c):
        http = httpx.Client(base_url=url, timeout=deadline_s) if kind == "httpx" else RawClient(url, deadline_s)
        try:
            for k in range(per_client):
                if time.monotonic() > stop_at:
                    return
                start = time.perf_counter()
                if kind == "httpx":
                    status = http.post("/v1/embeddings", json=make_body(c * per_client + k)).status_code
                else:
                    status = http.post("/v1/embeddings", make_body(c * per_client + k))
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if status == 200 else errors).append(elapsed if status == 200 else status)
        finally:
            http.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {"clients": clients, "items": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "items_per_s": round(len(latencies) / wall, 3), "p50_ms": round(1000 * pct(0.50), 1),
            "p99_ms": round(1000 * pct(0.99), 1)}


def single_client(url: str, calls: int, make_input) -> dict:
    """One ``openai`` client, one kept-open connection, ``calls`` text embeddings one after the other:
    the latency a lone client sees (each after the first reuses the connection, as the client does)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    client.embeddings.create(model="altclip", input=make_input(0))  # opens the connection
    latencies = []
    for i in range(calls):
        start = time.perf_counter()
        client.embeddings.create(model="altclip", input=make_input(i))
        latencies.append(time.perf_counter() - start)
    client.close()
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"calls": calls, "p50_ms": round(1000 * pct(0.50), 2), "p99_ms": round(1000 * pct(0.99), 2),
            "mean_ms": round(1000 * sum(latencies) / len(latencies), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: random full-size weights in --work-dir)")
    parser.add_argument("--arch", choices=["baai", "tiny"], default="baai", help="random checkpoint's architecture")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_serve"))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--text-clients", type=int, default=32)
    parser.add_argument("--texts-per-client", type=int, default=4)
    parser.add_argument("--image-clients", type=int, default=8)
    parser.add_argument("--images-per-client", type=int, default=2)
    parser.add_argument("--single-calls", type=int, default=200,
                        help="text embeddings one after the other on one kept-open connection with the openai "
                             "client, for single-client latency (0: skip)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the single-client latency, on the defaults (no load runs)")
    parser.add_argument("--deadline-s", type=float, default=300, help="per load run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--modes", default="dynamic batching,no batching",
                        help="comma-separated: which servers to run ('dynamic batching', 'no batching')")
    parser.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                        help="the text load's clients: httpx (as before) or a kept-open http.client connection, "
                             "which spends less of the shared CPU per request")
    parser.add_argument("--serve-flags", default="", help="more serve flags for every server (one string)")
    args = parser.parse_args(argv)

    model = Path(args.model) if args.model else build_checkpoint(Path(args.work_dir) / args.arch, args.arch)
    from PIL import Image

    from altclip_fast.preprocessing.tokenization import AltCLIPTokenizer
    from tests.altclip_fast.processor_fixtures import photo_like

    words = "a photo of the cat dog black white red car house tree".split()

    def text(i):
        return " ".join(words[(i + k) % len(words)] for k in range(4 + i % 5))

    longest = max(len(ids) for ids in AltCLIPTokenizer.from_pretrained(model)(
        [text(i) for i in range(64)], padding=False, return_tensors=None)["input_ids"])
    buffer = io.BytesIO()
    photo_like(320, 240).save(buffer, format="JPEG", quality=90)
    image = base64.b64encode(buffer.getvalue()).decode()
    Image.open(io.BytesIO(buffer.getvalue())).load()

    modes = {"dynamic batching": [], "no batching": ["--max-batch-images", "1", "--max-batch-tokens", str(longest)]}
    results = {"model": str(model), "dtype": args.dtype, "cpu_threads": os.cpu_count(), "runs": []}
    modes = {m: modes[m] for m in (["dynamic batching"] if args.latency_only else args.modes.split(","))}
    results["serve_flags"] = args.serve_flags
    for mode, options in modes.items():
        server = Server(model, args.dtype, options + shlex.split(args.serve_flags))
        try:
            load(server.url, 2, 1, lambda i: {"input": [text(i)]}, args.deadline_s)  # warm up
            if args.single_calls and mode == "dynamic batching":
                results["single_client"] = single_client(server.url, args.single_calls, text)
                print(json.dumps({"mode": "one openai client, one kept-open connection", "kind": "text",
                                  **results["single_client"]}), flush=True)
            if args.latency_only:
                continue
            row = measured(server.url, server.proc.pid, lambda: load(
                server.url, args.text_clients, args.texts_per_client, lambda i: {"input": [text(i)]}, args.deadline_s,
                args.client))
            results["runs"].append({"mode": mode, "kind": "text", **row})
            print(json.dumps(results["runs"][-1]), flush=True)
            if args.image_clients:
                row = load(server.url, args.image_clients, args.images_per_client,
                           lambda i: {"input": [image], "modality": "image"}, args.deadline_s)
                results["runs"].append({"mode": mode, "kind": "image", **row})
                print(json.dumps(results["runs"][-1]), flush=True)
        finally:
            server.stop()
    by = {(r["mode"], r["kind"]): r for r in results["runs"]}
    for kind in ("text", "image"):
        if ("dynamic batching", kind) in by and by.get(("no batching", kind), {}).get("items_per_s"):
            speedup = by[("dynamic batching", kind)]["items_per_s"] / by[("no batching", kind)]["items_per_s"]
            results[f"{kind}_speedup"] = round(speedup, 2)
            print(f"{kind}: dynamic batching {speedup:.2f}x the throughput of no batching", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
