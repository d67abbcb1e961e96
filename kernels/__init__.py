"""Triton kernels: pure functions on tensors, with no knowledge of AltCLIP.

One op per module, each a ``@triton.jit`` kernel plus a launcher that validates its inputs.
"""
from .attention import attention
from .layer_norm import add_layer_norm
from .linear import linear
