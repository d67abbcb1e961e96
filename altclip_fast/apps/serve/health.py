"""``/health``'s answer: a real tiny forward pass (``probe``) in the model thread, reused for ``ttl_s``
seconds; concurrent checks share one probe. A failing probe makes the server unhealthy (503) with the
error, and is counted as a ``health`` failure."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

__all__ = ["Health"]


class Health:
    def __init__(self, probe: Callable[[], None], executor, *, ttl_s: float, metrics, timeout_s: float = 60):
        self._probe, self._executor, self.ttl_s, self.metrics = probe, executor, ttl_s, metrics
        self.timeout_s = timeout_s
        self.ok, self.error, self.checked_at = False, None, -math.inf
        self._lock = asyncio.Lock()

    async def check(self) -> bool:
        """Probe unless the last answer is fresh; whether the model works."""
        async with self._lock:
            if time.monotonic() - self.checked_at >= self.ttl_s:
                loop = asyncio.get_running_loop()
                try:
                    await asyncio.wait_for(loop.run_in_executor(self._executor, self._probe), self.timeout_s)
                    self.ok, self.error = True, None
                except Exception as exc:
                    self.ok, self.error = False, f"{type(exc).__name__}: {exc}"[:500]
                    self.metrics.failure("health")
                self.checked_at = time.monotonic()
        return self.ok
