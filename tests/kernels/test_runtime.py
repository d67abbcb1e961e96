"""kernels._runtime: the autotune limit a short GPU run uses to skip tuning, and the architecture families
that config lists are chosen for."""

from __future__ import annotations

import pytest

from altclip_fast.kernels import _runtime


def test_autotune_limit_cuts_the_config_list(monkeypatch):
    configs = ["a", "b", "c"]
    monkeypatch.delenv(_runtime.AUTOTUNE_LIMIT_VAR, raising=False)
    assert _runtime.tuned_configs(configs) == configs
    monkeypatch.setenv(_runtime.AUTOTUNE_LIMIT_VAR, "1")
    assert _runtime.tuned_configs(configs) == ["a"]
    monkeypatch.setenv(_runtime.AUTOTUNE_LIMIT_VAR, "10")
    assert _runtime.tuned_configs(configs) == configs


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_autotune_limit_rejects_nonsense(monkeypatch, bad):
    monkeypatch.setenv(_runtime.AUTOTUNE_LIMIT_VAR, bad)
    with pytest.raises(ValueError, match=_runtime.AUTOTUNE_LIMIT_VAR):
        _runtime.tuned_configs(["a"])


def test_every_gpu_takes_the_config_family_at_or_below_its_architecture():
    assert _runtime.ARCH_FAMILIES == (80, 90)
    assert [_runtime.arch_family(c) for c in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 90, 90, 90]
