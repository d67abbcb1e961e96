"""Health alone: the probe runs in the given executor, its answer is reused for ttl_s, failures say why."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from altclip_fast.apps.serve.health import Health


class Failures:
    def __init__(self):
        self.reasons = []

    def failure(self, reason, count=1):
        self.reasons.append(reason)


class Probe:
    def __init__(self, delay=0.0):
        self.calls, self.threads, self.delay, self.error = 0, set(), delay, None

    def __call__(self):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.error:
            raise self.error


def test_the_answer_is_reused_for_ttl_and_concurrent_checks_share_one_probe():
    probe, failures = Probe(delay=0.05), Failures()

    async def main():
        with ThreadPoolExecutor(1, thread_name_prefix="model") as pool:
            health = Health(probe, pool, ttl_s=60, metrics=failures)
            assert await asyncio.gather(*(health.check() for _ in range(5))) == [True] * 5
            assert await health.check() is True
            return health

    health = asyncio.run(main())
    assert probe.calls == 1 and all(name.startswith("model") for name in probe.threads)
    assert (health.ok, health.error, failures.reasons) == (True, None, [])


def test_a_failing_probe_is_unhealthy_with_its_error_until_it_works_again():
    probe, failures = Probe(), Failures()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            health = Health(probe, pool, ttl_s=0, metrics=failures)
            probe.error = RuntimeError("x" * 1000)
            assert await health.check() is False
            error = health.error
            probe.error = None
            assert await health.check() is True
            return error, health.error

    error, after = asyncio.run(main())
    assert error.startswith("RuntimeError: xxx") and len(error) == 500
    assert after is None and failures.reasons == ["health"]


def test_a_probe_that_hangs_times_out():
    probe, failures = Probe(delay=0.5), Failures()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            health = Health(probe, pool, ttl_s=0, metrics=failures, timeout_s=0.05)
            return await health.check(), health.error

    assert asyncio.run(main()) == (False, "TimeoutError: ")
    assert failures.reasons == ["health"]
