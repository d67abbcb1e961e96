"""Fault injection for the tests, in one place: where a run can be killed, an actor lost, a batch slowed.

Each hook is switched on by a private environment variable (declared, with its meaning, in
``altclip_fast.environment``; the README lists them) and does nothing otherwise. Kills are real
``SIGKILL``s of this process, the way an OOM killer or a lost SSH session ends a run, so that what a
resumed run finds on disk is what a real crash leaves.

==============================  ==========================================  ==========================
hook                            environment variable                        called by
==============================  ==========================================  ==========================
``after_batch(saved)``          ``_ALTCLIP_FAST_CRASH_AFTER_BATCHES=N``     the local engine
``after_shard(written)``        ``_ALTCLIP_FAST_CRASH_AFTER_SHARDS=N``      both engines (the driver)
``before_meta()``               ``_ALTCLIP_FAST_CRASH_BEFORE_META=1``       the single-file writer
``before_shard_embeddings(k)``  ``_ALTCLIP_FAST_CRASH_BEFORE_SHARD_EMB=K``  the sharded writer
``actor_kill_marker()``         ``_ALTCLIP_FAST_RAY_KILL_ACTOR_ONCE=PATH``  the Ray engine's actors
``slow_forward()``              ``_ALTCLIP_FAST_SLOW_FORWARD_MS=MS``        serve's model thread
==============================  ==========================================  ==========================
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .. import environment

CRASH_AFTER_BATCHES = "_ALTCLIP_FAST_CRASH_AFTER_BATCHES"
CRASH_AFTER_SHARDS = "_ALTCLIP_FAST_CRASH_AFTER_SHARDS"
CRASH_BEFORE_META = "_ALTCLIP_FAST_CRASH_BEFORE_META"
CRASH_BEFORE_SHARD_EMB = "_ALTCLIP_FAST_CRASH_BEFORE_SHARD_EMB"
RAY_KILL_ACTOR_ONCE = "_ALTCLIP_FAST_RAY_KILL_ACTOR_ONCE"
SLOW_FORWARD_MS = "_ALTCLIP_FAST_SLOW_FORWARD_MS"


def _count(name: str) -> int:
    return int(environment.get(name) or 0)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_batch(saved: int) -> None:
    """The run has saved ``saved`` batches so far."""
    limit = _count(CRASH_AFTER_BATCHES)
    if limit and saved >= limit:
        _kill_self()


def kills_after_shards() -> bool:
    """Whether ``after_shard`` will kill (the Ray engine then writes one shard at a time, so that exactly
    that many are written when the driver dies)."""
    return _count(CRASH_AFTER_SHARDS) > 0


def after_shard(written: int) -> None:
    """The run has written ``written`` shards so far."""
    limit = _count(CRASH_AFTER_SHARDS)
    if limit and written >= limit:
        _kill_self()


def before_meta() -> None:
    """The single-file output is in place and its metadata not yet."""
    if environment.get(CRASH_BEFORE_META):
        _kill_self()


def before_shard_embeddings(k: int) -> None:
    """Shard ``k``'s metadata is in place and its embeddings not yet."""
    shard = environment.get(CRASH_BEFORE_SHARD_EMB)
    if shard and int(shard) == k:
        _kill_self()


def actor_kill_marker() -> str | None:
    """Read on the driver and handed to the actors (a cluster's workers may not share its environment)."""
    return environment.get(RAY_KILL_ACTOR_ONCE) or None


def kill_actor_once(marker: str | None) -> None:
    """In a Ray actor: the first call that finds no file at ``marker`` creates it and kills the actor."""
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def slow_forward() -> None:
    """Hold a serve batch before its forward pass (queue-full and client-gone drills)."""
    ms = float(environment.get(SLOW_FORWARD_MS) or 0)
    if ms > 0:
        time.sleep(ms / 1000)
