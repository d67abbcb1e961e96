"""``altclip-fast serve --collection`` as a search service: text queries through the full model, then
exact search over N x D float16 rows, measured from HTTP clients on 127.0.0.1.

It builds (or reuses, from ``--cache-dir``) a collection of random L2-normalised float16 rows with
metadata parquet in ``embed --out-dir``'s layout (``img_emb/img_emb_{k}.npy``, ``metadata/metadata_{k}.parquet``,
shard numbers zero-padded), starts the real server in a subprocess on an ephemeral port with
``--collection bench=DIR``, and sends ``POST /v1/search`` text queries (``top_k`` 10, the image index):

- one client, one kept-open connection, ``--single-calls`` queries one after the other: p50 / p99;
- ``--clients`` concurrent clients (one connection each), ``--per-client`` queries each, back to back:
  throughput and p50 / p99, and its ratio to the one-client throughput (the goal: at least 5x);
- the server's resident memory (``/proc/PID/status``: VmRSS, split into anonymous and file pages,
  and the peak VmHWM), and the load average sampled during the run (other users share the CPU).

With ``--faiss-index FACTORY`` (a faiss ``index_factory`` string, e.g. ``IVF1024,Flat``; the ``[index]``
extra) it also builds that index over the same rows in clip-retrieval's order (cached), serves it with
``--faiss bench``, and measures the same two loads with it plus recall@10 against exact search on the
same texts (``"search": "exact"`` in the request). Every loop is bounded in count and by
``--deadline-s``; nothing leaves the loopback interface.

Without ``--model`` it writes a random checkpoint in BAAI/AltCLIP's full-size architecture (or
``--arch tiny``) into ``--work-dir``, as bench_serve.py does, so nothing is downloaded::

    python bench/bench_search_service.py --rows 1000000 --dtype bf16 [--model DIR] [--faiss-index IVF1024,Flat]
    python bench/bench_search_service.py --rows 20000 --arch tiny --single-calls 20 --per-client 2   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORDS = ("a photo of the black white red small big cat dog car house tree street beach mountain city night "
         "ein Foto von un chat noir 一只 猫").split()


def text(i: int) -> str:
    """Query ``i``: 4 to 8 words, varied."""
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5))


def build_collection(root: Path, rows: int, dim: int, shard_size: int, seed: int = 0) -> Path:
    """``rows`` random unit float16 rows with captions in ``embed --out-dir``'s layout under ``root``
    (``bench_search.make``; reused when a finished one with the same sizes is there)."""
    from bench_search import make

    stamp = {"rows": rows, "dim": dim, "shard_size": shard_size, "seed": seed}
    done = root / "bench-collection.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return root
    for sub in ("img_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for old in (root / sub).iterdir():
            old.unlink()
    make(root, rows, dim, shard_size, seed, captions=True)
    done.write_text(json.dumps(stamp))
    return root


def build_faiss(root: Path, factory: str, nprobe: int, ef_search: int) -> float:
    """``root/image.index``, a ``factory`` index over the shards in clip-retrieval's order (file names
    sorted), inner product; reused when one for the same factory exists. Returns its build seconds."""
    import faiss

    stamp, done = {"factory": factory, "nprobe": nprobe, "ef_search": ef_search}, root / "bench-faiss.json"
    if done.is_file() and json.loads(done.read_text()) == stamp and (root / "image.index").is_file():
        return float("nan")
    paths = sorted((root / "img_emb").glob("*.npy"), key=str)
    shards = [np.load(p, mmap_mode="r") for p in paths]
    dim = shards[0].shape[1]
    start = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.concatenate([np.asarray(s[: max(1, 100_000 // len(shards))], dtype=np.float32) for s in shards])
        index.train(sample)
    for shard in shards:
        for begin in range(0, len(shard), 50_000):
            index.add(np.asarray(shard[begin:begin + 50_000], dtype=np.float32))
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if "HNSW" in factory:
        faiss.downcast_index(index).hnsw.efSearch = ef_search
    faiss.write_index(index, str(root / "image.index"))
    done.write_text(json.dumps(stamp))
    return time.perf_counter() - start


class LoadAverage:
    """Samples ``/proc/loadavg`` (1-minute figure) every ``interval`` seconds while in use."""

    def __init__(self, interval: float = 2.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


def memory(pid: int) -> dict:
    """The process's resident memory in MiB, from ``/proc/PID/status``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = round(int(value.split()[0]) / 1024)
    return fields


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 1) if values else float("nan")


async def _clients(url: str, clients: int, per_client: int, body, deadline_s: float, path: str) -> dict:
    import httpx

    latencies, errors, replies = [], [], {}
    stop_at = time.monotonic() + deadline_s

    async def one(c: int, http):
        for k in range(per_client):
            if time.monotonic() > stop_at:
                return
            i = c * per_client + k
            start = time.perf_counter()
            r = await http.post(path, json=body(i))
            elapsed = time.perf_counter() - start
            if r.status_code == 200:
                latencies.append(elapsed)
                if path == "/v1/search":
                    replies[i] = r.json()
            else:
                errors.append(r.status_code)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s, limits=limits) as http:
        # open every connection (and warm up) before the clock starts
        await asyncio.gather(*(http.post(path, json=body(-1 - c)) for c in range(clients)))
        start, mine = time.perf_counter(), os.times()
        await asyncio.gather(*(one(c, http) for c in range(clients)))
        wall, spent = time.perf_counter() - start, os.times()
    # the clients share the server's cores: what they spent is CPU the server did not get
    client_cpu = round(spent.user + spent.system - mine.user - mine.system, 2)
    engines = sorted({r.get("search", "?") for r in replies.values()}) if path == "/v1/search" else []
    return {"clients": clients, "queries": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "queries_per_s": round(len(latencies) / wall, 2) if wall else float("nan"),
            "p50_ms": _pct(latencies, 0.50), "p99_ms": _pct(latencies, 0.99), "client_cpu_s": client_cpu,
            "answered_by": engines,
            "_replies": replies}


def run_load(url: str, clients: int, per_client: int, search: str | None, deadline_s: float, offset: int = 0,
             part: str = "both"):
    """``part``: "both" (text queries), "search" (query embeddings: no model) or "model" (the texts'
    embeddings alone, ``/v1/embeddings``)."""
    dim = [None]

    def body(i):
        if part == "model":
            return {"input": [text(offset + i)]}
        if part == "search":
            row = np.random.default_rng(abs(offset + i)).standard_normal(dim[0]).astype(np.float32)
            request = {"input": (row / np.linalg.norm(row)).tolist(), "modality": "embedding"}
        else:
            request = {"input": text(offset + i)}
        request = {**request, "collection": "bench", "top_k": 10}
        return request if search is None else {**request, "search": search}
    if part == "search":
        import httpx

        probe = httpx.post(url + "/v1/embeddings", json={"input": ["x"]}, timeout=60).json()
        dim[0] = len(probe["data"][0]["embedding"])
    path = "/v1/embeddings" if part == "model" else "/v1/search"
    return asyncio.run(_clients(url, clients, per_client, body, deadline_s, path))


def recall_at_10(exact: dict, approx: dict) -> float:
    shared = sorted(set(exact) & set(approx))
    hits = [len({d["id"] for d in exact[i]["data"]} & {d["id"] for d in approx[i]["data"]}) / 10 for i in shared]
    return round(float(np.mean(hits)), 4) if hits else float("nan")


def measure(server, args, label: str, search: str | None = None, part: str = "both") -> dict:
    """Warm up, then one client in sequence and ``args.clients`` at once (each a fresh set of texts)."""
    run_load(server.url, 4, 2, search, args.deadline_s, offset=10**6, part=part)  # warm up: norms, batch shapes
    single = run_load(server.url, 1, args.single_calls, search, args.deadline_s, part=part)
    many = run_load(server.url, args.clients, args.per_client, search, args.deadline_s, offset=args.single_calls,
                    part=part)
    out = {"label": label, "single": single, "concurrent": many,
           "ratio": round(many["queries_per_s"] / single["queries_per_s"], 2),
           "server_memory_mib": memory(server.proc.pid)}
    shown = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
             for k, v in out.items()}
    print(json.dumps(shown), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, help="the rows' size (default: the model's projection_dim)")
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_search_service"))
    parser.add_argument("--model", help="checkpoint directory (default: random weights in --work-dir)")
    parser.add_argument("--arch", choices=["baai", "tiny"], default="baai", help="random checkpoint's architecture")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "altclip_bench_serve"))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--single-calls", type=int, default=100)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=16)
    parser.add_argument("--faiss-index", help="also serve a faiss index of this factory string (e.g. IVF1024,Flat)")
    parser.add_argument("--nprobe", type=int, default=32, help="an IVF index's nprobe, stored in the index")
    parser.add_argument("--ef-search", type=int, default=64, help="an HNSW index's efSearch, stored in the index")
    parser.add_argument("--breakdown", action="store_true",
                        help="also the same loads on each half alone: query embeddings searched (no model), and "
                             "the texts embedded (/v1/embeddings, no search)")
    parser.add_argument("--deadline-s", type=float, default=300, help="per load run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if min(args.rows, args.shard_size, args.single_calls, args.clients, args.per_client) < 1:
        parser.error("sizes and counts must be at least 1")

    from bench_serve import Server, build_checkpoint

    model = Path(args.model) if args.model else build_checkpoint(Path(args.work_dir) / args.arch, args.arch)
    projection = json.loads((model / "config.json").read_text())["projection_dim"]
    args.dim = args.dim or projection
    if projection != args.dim:
        parser.error(f"--dim {args.dim} is not the model's projection_dim {projection}")
    root = Path(args.cache_dir) / f"{args.rows}x{args.dim}"
    start = time.perf_counter()
    build_collection(root, args.rows, args.dim, args.shard_size)
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "cpu_count": os.cpu_count(), "model": str(model), "dtype": args.dtype, "rows": args.rows,
               "dim": args.dim, "collection_ready_s": round(time.perf_counter() - start, 1), "runs": []}
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}), flush=True)
    with LoadAverage() as loadavg:
        server = Server(model, args.dtype, ["--collection", f"bench={root}"])
        try:
            results["runs"].append(measure(server, args, "exact"))
            if args.breakdown:
                results["runs"].append(measure(server, args, "exact search alone (embedding queries)", part="search"))
                results["runs"].append(measure(server, args, "the model alone (/v1/embeddings)", part="model"))
        finally:
            server.stop()
        if args.faiss_index:
            results["faiss_build_s"] = round(build_faiss(root, args.faiss_index, args.nprobe, args.ef_search), 1)
            server = Server(model, args.dtype, ["--collection", f"bench={root}", "--faiss", "bench"])
            try:
                tuned = f"efSearch {args.ef_search}" if "HNSW" in args.faiss_index else f"nprobe {args.nprobe}"
                faiss_run = measure(server, args, f"faiss {args.faiss_index} {tuned}")
                exact = run_load(server.url, 1, args.single_calls, "exact", args.deadline_s)  # the same texts
                faiss_run["recall_at_10"] = recall_at_10(exact["_replies"], faiss_run["single"]["_replies"])
                faiss_run["exact_on_this_server"] = {k: v for k, v in exact.items() if not k.startswith("_")}
                results["runs"].append(faiss_run)
                print(json.dumps({"recall_at_10": faiss_run["recall_at_10"], "exact single p50 here":
                                  exact["p50_ms"]}), flush=True)
            finally:
                server.stop()
    results["load_average_1min"] = loadavg.summary()
    for run in results["runs"]:
        for part in ("single", "concurrent"):
            run[part].pop("_replies", None)
    summary = results["runs"][0]
    print(f"exact: 1 client p50 {summary['single']['p50_ms']} ms, p99 {summary['single']['p99_ms']} ms, "
          f"{summary['single']['queries_per_s']} q/s; {args.clients} clients {summary['concurrent']['queries_per_s']} "
          f"q/s, p99 {summary['concurrent']['p99_ms']} ms: {summary['ratio']}x (goal 5x); server RSS "
          f"{summary['server_memory_mib']}; load average {results['load_average_1min']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
