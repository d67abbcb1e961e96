"""The served model's CPU thread count (``--threads``): the rule, and that torch runs the forward pass
with it in the thread that owns the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")

from altclip_fast.apps.serve.model import available_cpus, model_threads, use_model_threads  # noqa: E402


@pytest.mark.parametrize(("requested", "cpus", "current", "expected"), [
    (0, 2, 2, None), (0, 64, 32, None),  # torch's own choice fits: left alone
    (0, 2, 16, 2), (0, 1, 2, 1),  # more threads than the cores this process may use: capped
    (2, 2, 2, 2), (1, 64, 32, 1), (8, 2, 2, 8),  # asked for: as asked
])
def test_the_thread_rule(requested, cpus, current, expected):
    assert model_threads(requested, cpus, current) == expected


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


@pytest.mark.parametrize("current", [1, 64])
def test_automatic_threads_follow_the_rule(restore_threads, current):
    torch.set_num_threads(current)
    expected = model_threads(0, available_cpus(), current)
    assert use_model_threads(0, torch.device("cpu")) == expected
    assert torch.get_num_threads() == (current if expected is None else expected)
    if current > available_cpus():  # never more threads than cores to run them
        assert expected == torch.get_num_threads() == available_cpus()


def test_a_gpu_model_leaves_the_cpu_threads_alone(restore_threads):
    torch.set_num_threads(3)
    assert use_model_threads(1, torch.device("cuda")) is None
    assert torch.get_num_threads() == 3
