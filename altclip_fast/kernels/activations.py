"""Activation names the kernels know, and the constants that define them. Importing this needs no Triton.

``quick_gelu(x) = x * sigmoid(QUICK_GELU_ALPHA * x)`` (CLIP's vision MLP); ``gelu`` is the exact erf
GELU. ``EPILOGUE_CODES`` maps each name (and None) to the compile-time code the linear kernel's
epilogue branches on.
"""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "EPILOGUE_CODES", "QUICK_GELU_ALPHA"]

QUICK_GELU_ALPHA = 1.702
ACTIVATIONS = ("gelu", "quick_gelu")
EPILOGUE_CODES = {None: 0, "gelu": 1, "quick_gelu": 2}
