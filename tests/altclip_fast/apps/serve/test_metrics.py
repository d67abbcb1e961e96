"""Metrics alone: the names Prometheus scrapes and what each hook counts."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from altclip_fast.apps.serve.metrics import Metrics  # noqa: E402
from tests.altclip_fast.apps.serve.helpers import counter  # noqa: E402


def page(metrics: Metrics) -> str:
    payload, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return payload.decode()


def test_the_hooks_count_under_the_documented_names():
    m = Metrics()
    m.queue_depth("text", 3)
    m.batch("text", items=2, tokens=17, waits=[0.01, 0.02], seconds=0.5)
    m.batch("image", items=1, tokens=0, waits=[0.03], seconds=0.25)
    m.label_cache(hits=2, misses=1)
    m.failure("queue_full")
    m.failure("client_disconnected", 3)
    m.request("/v1/embeddings", 200)
    text = page(m)
    assert 'altclip_queue_depth{modality="text"} 3.0' in text
    assert 'altclip_queue_depth{modality="image"} 0.0' in text
    assert 'altclip_batch_items_count{modality="text"} 1.0' in text
    assert 'altclip_batch_items_sum{modality="image"} 1.0' in text
    assert counter(text, "altclip_batch_tokens_sum") == 17 and counter(text, "altclip_batch_tokens_count") == 1
    assert 'altclip_queue_wait_seconds_count{modality="text"} 2.0' in text
    assert 'altclip_inference_seconds_sum{modality="image"} 0.25' in text
    assert counter(text, "altclip_label_cache_hits_total") == 2
    assert counter(text, "altclip_label_cache_misses_total") == 1
    assert 'altclip_failures_total{reason="queue_full"} 1.0' in text
    assert 'altclip_failures_total{reason="client_disconnected"} 3.0' in text
    assert 'altclip_requests_total{route="/v1/embeddings",status="200"} 1.0' in text


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.failure("health")
    assert 'reason="health"' in page(a) and 'reason="health"' not in page(b)
