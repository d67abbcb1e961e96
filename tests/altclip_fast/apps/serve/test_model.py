"""The served model's CPU thread count (``--threads``): the rule, and that torch runs the forward pass
with it in the thread that owns the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")

from altclip_fast.apps.serve.model import FEW_CORES, available_cpus, model_threads, use_model_threads  # noqa: E402


@pytest.mark.parametrize(("requested", "cpus", "expected"), [
    (0, 1, 1), (0, 2, 1), (0, 3, 2), (0, FEW_CORES, FEW_CORES - 1),  # few cores: one left to the rest
    (0, FEW_CORES + 1, None), (0, 64, None),  # many: torch's own choice
    (2, 2, 2), (1, 64, 1), (8, 2, 8),  # asked for: as asked
])
def test_the_thread_rule(requested, cpus, expected):
    assert model_threads(requested, cpus) == expected


def test_available_cpus_counts_the_affinity_mask():
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == expected >= 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("requested", [1, 3])
def test_the_setting_reaches_the_model_thread(restore_threads, requested):
    """Set in the main thread before the model thread exists, as ``serve`` does; read where batches run."""
    assert use_model_threads(requested, torch.device("cpu")) == requested
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="altclip-model") as pool:
        assert pool.submit(torch.get_num_threads).result(30) == requested
    assert torch.get_num_threads() == requested


def test_automatic_threads_follow_the_rule(restore_threads):
    torch.set_num_threads(7)
    expected = model_threads(0, available_cpus())
    assert use_model_threads(0, torch.device("cpu")) == expected
    assert torch.get_num_threads() == (7 if expected is None else expected)


def test_a_gpu_model_leaves_the_cpu_threads_alone(restore_threads):
    torch.set_num_threads(3)
    assert use_model_threads(1, torch.device("cuda")) is None
    assert torch.get_num_threads() == 3
