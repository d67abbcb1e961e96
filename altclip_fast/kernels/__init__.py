"""Triton kernels: pure functions on tensors, with no knowledge of AltCLIP.

One op per module, each a ``@triton.jit`` kernel plus a launcher that validates its inputs. The ops
are imported on first use (``kernels.linear`` ...), so ``kernels.activations`` can be imported without
Triton, and without fixing the ``TRITON_INTERPRET`` setting the kernels are defined under.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["attention", "add_layer_norm", "linear"]

# op -> the module that defines it
_OPS = {"attention": "attention", "add_layer_norm": "layer_norm", "linear": "linear"}


def __getattr__(name: str):
    if name in _OPS:
        return getattr(importlib.import_module(f".{_OPS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing submodule ``linear`` (or ``attention``) binds the package attribute of that name to the
    module, which would hide the op of the same name: keep the op there, as an eager
    ``from .linear import linear`` would."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}" and name in _OPS:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
