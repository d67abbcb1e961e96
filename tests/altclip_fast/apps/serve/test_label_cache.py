"""LabelCache alone: least recently used out first, hits and misses per request."""

from __future__ import annotations

import numpy as np
import pytest

from altclip_fast.apps.serve.label_cache import LabelCache


def rows(*keys):
    return {k: np.full(2, float(sum(k))) for k in keys}


def test_lookup_finds_what_was_remembered_and_lists_the_rest_once():
    cache = LabelCache(4)
    assert cache.lookup([(1,), (2,), (1,)]) == ({}, [(1,), (2,)])
    assert cache.remember([(1,), (2,), (1,)], rows((1,), (2,)), misses=2) == (0, 2)
    found, missing = cache.lookup([(2,), (3,), (2,)])
    assert list(found) == [(2,)] and missing == [(3,)]
    np.testing.assert_array_equal(found[(2,)], [2.0, 2.0])
    assert cache.remember([(2,), (3,), (2,)], {**found, **rows((3,))}, misses=1) == (1, 1)
    assert (cache.hits, cache.misses) == (1, 3)


def test_least_recently_used_is_evicted_first():
    cache = LabelCache(3)
    cache.remember([(1,), (2,), (3,)], rows((1,), (2,), (3,)), misses=3)
    assert cache.keys() == [(1,), (2,), (3,)]
    cache.remember([(1,)], rows((1,)), misses=0)  # used again: now the most recent
    assert cache.keys() == [(2,), (3,), (1,)]
    cache.remember([(4,), (5,)], rows((4,), (5,)), misses=2)
    assert cache.keys() == [(1,), (4,), (5,)] and len(cache) == 3
    assert (2,) not in cache and (1,) in cache


def test_lookup_does_not_touch_recency():
    cache = LabelCache(2)
    cache.remember([(1,), (2,)], rows((1,), (2,)), misses=2)
    cache.lookup([(1,)])
    assert cache.keys() == [(1,), (2,)]


def test_size_zero_keeps_nothing_but_still_counts():
    cache = LabelCache(0)
    assert cache.remember([(1,)], rows((1,)), misses=1) == (0, 1)
    assert len(cache) == 0 and cache.lookup([(1,)]) == ({}, [(1,)])
    with pytest.raises(ValueError):
        LabelCache(-1)
