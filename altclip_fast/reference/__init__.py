"""Plain PyTorch AltCLIP, faithful to transformers' modeling_altclip.py: the numerical ground truth.

It knows nothing about kernels. ``reference.ops`` holds the plain ops the kernel tests compare against.
"""

from .modeling import AltCLIPModel, AltCLIPTextModel, AltCLIPVisionModel

__all__ = ["AltCLIPModel", "AltCLIPTextModel", "AltCLIPVisionModel"]
