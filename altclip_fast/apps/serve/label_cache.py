"""Label rows for ``/v1/classify``, kept for reuse: clients send the same labels request after request,
so their rows, keyed by token ids (the model's whole input), skip the model after the first time.

Least recently used out first, at most ``size`` rows (0 keeps none). Used from the event loop only
(no lock). A request takes its rows with ``lookup`` before it waits for the model (other requests may
evict them meanwhile), then hands every row it used to ``remember``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

import numpy as np

__all__ = ["LabelCache"]


class LabelCache:
    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"size must be at least 0, got {size}")
        self.size = size
        self.hits = 0  # distinct labels per request found here, summed over requests
        self.misses = 0  # distinct labels per request that had to run through the model
        self._rows: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._rows)

    def lookup(self, keys: Iterable[Hashable]) -> tuple[dict, list]:
        """``(found, missing)``: the rows held for ``keys``, and the keys without one (distinct, in
        order). Recency is not touched here: ``remember`` does that once the request has all its rows."""
        keys = list(keys)
        found = {k: self._rows[k] for k in keys if k in self._rows}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        return found, missing

    def remember(self, keys: Iterable[Hashable], rows: dict, misses: int) -> tuple[int, int]:
        """Store ``rows[k]`` for every key as the most recently used, evict past ``size``, count a
        request's hits and ``misses``; returns the request's ``(hits, misses)``."""
        distinct = list(dict.fromkeys(keys))
        hits = len(distinct) - misses
        self.hits += hits
        self.misses += misses
        for key in distinct:
            self._rows[key] = rows[key]
            self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return hits, misses
