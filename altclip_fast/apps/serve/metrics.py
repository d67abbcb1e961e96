"""Prometheus metrics, in a registry of their own per application (several apps may live in one test
process). The batcher calls ``queue_depth``, ``batch`` and ``failure``; the routes call the rest.
``prometheus_client`` is imported when a ``Metrics`` is made, never at import."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Metrics"]


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._depth = Gauge("altclip_queue_depth", "Items waiting in the batch queue", ["modality"],
                            registry=self.registry)
        self._items = Histogram("altclip_batch_items", "Items per model batch", ["modality"], registry=self.registry,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self._tokens = Histogram("altclip_batch_tokens", "Real tokens per text batch", registry=self.registry,
                                 buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
        self._wait = Histogram("altclip_queue_wait_seconds", "Time an item waited before its batch ran",
                               ["modality"], registry=self.registry)
        self._infer = Histogram("altclip_inference_seconds", "Forward pass time per batch", ["modality"],
                                registry=self.registry)
        self._failures = Counter("altclip_failures", "Failed or refused requests and items, by reason", ["reason"],
                                 registry=self.registry)
        self._requests = Counter("altclip_requests", "Requests by route and status", ["route", "status"],
                                 registry=self.registry)
        self._label_hits = Counter("altclip_label_cache_hits", "Classification labels served from the cache",
                                   registry=self.registry)
        self._label_misses = Counter("altclip_label_cache_misses", "Classification labels run through the model",
                                     registry=self.registry)
        for kind in ("text", "image"):
            self._depth.labels(kind).set(0)

    def queue_depth(self, kind: str, depth: int) -> None:
        self._depth.labels(kind).set(depth)

    def batch(self, kind: str, items: int, tokens: int, waits: Sequence[float], seconds: float) -> None:
        self._items.labels(kind).observe(items)
        if kind == "text":
            self._tokens.observe(tokens)
        for wait in waits:
            self._wait.labels(kind).observe(wait)
        self._infer.labels(kind).observe(seconds)

    def label_cache(self, hits: int, misses: int) -> None:
        self._label_hits.inc(hits)
        self._label_misses.inc(misses)

    def failure(self, reason: str, count: int = 1) -> None:
        self._failures.labels(reason).inc(count)

    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
