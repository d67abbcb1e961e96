"""altclip-fast: fast AltCLIP inference with fused Triton kernels, in parity with transformers.

Submodules are imported on first use, so that ``altclip_fast.config`` and
``altclip_fast.checkpoint`` (which the reference model reuses) pull in neither kernels nor Triton.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "AltCLIPConfig": "config",
    "AltCLIPTextConfig": "config",
    "AltCLIPVisionConfig": "config",
    "AltCLIPError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "AltCLIPModel": "model",
    "AltCLIPTextModel": "model",
    "AltCLIPVisionModel": "model",
    "optimize": "optimize",
    "AltCLIPProcessor": "processor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
