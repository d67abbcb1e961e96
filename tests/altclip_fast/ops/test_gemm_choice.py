"""altclip_fast.ops.gemm_choice: the per-shape GEMM path is measured once, remembered, and never measured
while tracing or capturing; the Triton backend keys it by shape and both candidates give one answer.
The timings here are injected; the GPU test times real kernels."""

from __future__ import annotations

import pytest
import torch

from altclip_fast.ops.triton_backend import TritonOps

from altclip_fast.ops import gemm_choice
from altclip_fast.reference import ops as ref


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class FakeTimer:
    """Runs each candidate once (as a real timer would) and returns preset seconds per candidate."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.timed = []
        self.outputs = {}

    def __call__(self, fn):
        # MeasuredChoice times the candidates in their dict order: name them by position.
        name = list(self.seconds)[len(self.timed) % len(self.seconds)]
        self.timed.append(name)
        self.outputs[name] = fn()
        return self.seconds[name]


def test_mode_defaults_to_auto_and_rejects_unknown_names(monkeypatch):
    monkeypatch.delenv(gemm_choice.ENV_VAR, raising=False)
    assert gemm_choice.gemm_mode() == "auto"
    monkeypatch.setenv(gemm_choice.ENV_VAR, " Torch ")
    assert gemm_choice.gemm_mode() == "torch"
    monkeypatch.setenv(gemm_choice.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="ALTCLIP_FAST_GEMM must be one of auto, triton, torch"):
        gemm_choice.gemm_mode()


def test_the_faster_candidate_is_measured_once_per_key_and_remembered():
    timer = FakeTimer({"triton": 2.0, "torch": 1.0})
    choice = gemm_choice.MeasuredChoice(timer=timer)
    candidates = {"triton": lambda: "t", "torch": lambda: "c"}
    assert choice.pick(("a",), candidates, default="triton") == "torch"
    assert choice.pick(("a",), candidates, default="triton") == "torch"
    assert timer.timed == ["triton", "torch"]  # the second pick measured nothing
    timer.seconds = {"triton": 0.5, "torch": 1.0}
    assert choice.pick(("b",), candidates, default="torch") == "triton"  # another key, its own measurement
    assert choice.report() == [
        {"key": ["a"], "choice": "torch", "seconds": {"triton": 2.0, "torch": 1.0}},
        {"key": ["b"], "choice": "triton", "seconds": {"triton": 0.5, "torch": 1.0}},
    ]


def test_nothing_is_measured_while_tracing_or_capturing(monkeypatch):
    timer = FakeTimer({"triton": 2.0, "torch": 1.0})
    choice = gemm_choice.MeasuredChoice(timer=timer)
    candidates = {"triton": lambda: None, "torch": lambda: None}
    monkeypatch.setattr(gemm_choice, "can_measure", lambda: False)
    assert choice.pick(("k",), candidates, default="triton") == "triton"
    assert timer.timed == [] and choice.choices == {}  # the default is not remembered...
    monkeypatch.setattr(gemm_choice, "can_measure", lambda: True)
    assert choice.pick(("k",), candidates, default="triton") == "torch"  # ...so an eager call measures


def test_can_measure_is_false_inside_torch_compile():
    seen = []

    def probe(x):
        seen.append(gemm_choice.can_measure())
        return x + 1

    assert gemm_choice.can_measure()
    torch.compile(probe, backend="eager", fullgraph=True)(torch.ones(2))
    assert seen == [False]


INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors (interpreter)")


@INTERPRETER_ONLY
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
def test_triton_backend_keys_by_shape_and_both_paths_agree(monkeypatch, activation):
    """The measured key buckets rows to a power of two (packed text changes the count every batch), and
    the two candidates it times compute the same thing."""
    ops = TritonOps()
    timer = FakeTimer({"triton": 2.0, "torch": 1.0})
    ops.gemm_paths = gemm_choice.MeasuredChoice(timer=timer)
    w, b, r = rand(24, 40, seed=2) / 6, rand(24, seed=3), rand(13, 24, seed=4)
    x = rand(13, 40, seed=1)
    assert ops._measured_path(x, w, b, activation, r) == "torch"
    want = ref.linear(x, w, b, activation=activation, residual=r)
    for name in ("triton", "torch"):
        torch.testing.assert_close(timer.outputs[name], want, atol=2e-5, rtol=2e-5)
    (key,) = ops.gemm_paths.choices
    assert key == ("cpu", "float32", 16, 24, 40, True, activation, True, False)
    # 9 rows share 13's bucket: no new measurement; 17 rows are a new key.
    assert ops._measured_path(rand(9, 40), w, b, activation, r[:9]) == "torch" and len(timer.timed) == 2
    ops._measured_path(rand(17, 40), w, b, activation, rand(17, 24))
    assert len(timer.timed) == 4 and len(ops.gemm_paths.choices) == 2


@INTERPRETER_ONLY
def test_auto_runs_the_kernels_under_the_interpreter(monkeypatch):
    """On CPU the Triton backend exists to run the kernels: auto measures nothing there."""
    monkeypatch.delenv(gemm_choice.ENV_VAR, raising=False)
    ops = TritonOps()
    calls = []
    real = ops.kernels.linear
    monkeypatch.setattr(ops.kernels, "linear", lambda *a, **k: calls.append("kernel") or real(*a, **k))
    x, w, b = rand(5, 32, seed=1), rand(16, 32, seed=2) / 6, rand(16, seed=3)
    torch.testing.assert_close(ops.linear(x, w, b, activation="gelu"), ref.linear(x, w, b, activation="gelu"),
                               atol=2e-5, rtol=2e-5)
    assert calls == ["kernel"] and ops.gemm_paths.choices == {}


@pytest.mark.gpu
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
def test_gpu_auto_measures_real_paths_and_stays_correct(monkeypatch, activation):
    monkeypatch.delenv(gemm_choice.ENV_VAR, raising=False)
    ops = TritonOps()
    x = rand(300, 256, seed=1).cuda().half()
    w, b, r = (rand(512, 256, seed=2) / 16).cuda().half(), rand(512, seed=3).cuda().half(), rand(300, 512, seed=4).cuda().half()
    got = ops.linear(x, w, b, activation=activation, residual=r)
    want = ref.linear(x.float(), w.float(), b.float(), activation=activation, residual=r.float())
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=1e-2)
    ((key, choice),) = ops.gemm_paths.choices.items()
    timings = ops.gemm_paths.timings[key]
    assert key[2] == 512 and set(timings) == {"triton", "torch"}  # both real paths were timed
    assert all(t > 0 for t in timings.values())
    assert choice == min(timings, key=timings.get)  # and the faster one is what runs
