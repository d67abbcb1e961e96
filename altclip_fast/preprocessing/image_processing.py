"""Image preprocessing for AltCLIP with pillow: what transformers' PIL-based ``CLIPImageProcessor`` does.

The pipeline is: decode, convert to RGB, resize the shortest edge (bicubic), center crop, rescale,
normalise. It is split in two halves so that a DataLoader worker can run the expensive one:

- ``load_rgb(image)`` + ``resize_and_crop(rgb)``: decoding and resampling, giving a ``uint8``
  ``[3, H, W]`` array (a quarter of the bytes of float32 to send between processes);
- ``to_pixel_values(uint8 batch)``: rescale and normalise through a 256-entry table per channel,
  which reproduces transformers' float64-rescale / float32-normalise arithmetic bit for bit
  (``to_pixel_values_torch`` does the same lookup on the GPU, after a uint8 upload).

Where this deliberately differs from transformers (each is tested and in the README):

- EXIF orientation: applied by default (``exif_transpose=True``). transformers applies it when it is
  given a *path* (its ``load_image`` calls ``ImageOps.exif_transpose``) but not when it is given an
  already opened PIL image, so the same photo gives two different embeddings there. A photo taken
  with a phone held upright should be seen upright; pass ``exif_transpose=False`` for transformers'
  behaviour on in-memory PIL images.
- Transparency is composited onto white for every input, as transformers does for PIL images and
  arrays. (Its path loader calls ``convert("RGB")`` first, which keeps whatever colour hides under
  transparent pixels, often black.) The same file therefore gives the same pixels however it is passed.
- 16-bit grayscale (``I;16*`` modes, e.g. 16-bit PNGs) is scaled to 8 bits (``round(v * 255 / 65535)``).
  Pillow's ``convert("RGB")``, which transformers uses, clips at 255, so any real 16-bit photo
  comes out almost white.
- ``fast_decode=True`` (off by default) decodes JPEG files at a reduced scale (libjpeg's DCT
  scaling, never below twice the resize target) before the bicubic resize. Camera-sized photos
  then preprocess faster (bench/RESULTS.md has the figures), but pixels differ from transformers'
  (a few levels of 255 here and there): it is the one option that trades parity for speed.
- Image files given by path are opened only in the raster formats of ``image_formats`` (JPEG,
  PNG, WebP, GIF, BMP, TIFF, PPM/PGM/PBM); any other (EPS, which Pillow hands to Ghostscript, PSD,
  ICO...) is an ``ImageLoadError`` naming it. Already opened PIL images are taken as they are.

Arrays (numpy or torch) follow transformers' conventions: ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``
with 1, 3 or 4 channels (channels-first wins when both ends could be channels); uint8 or
integer-valued arrays are 0-255, float arrays with values in [0, 1] are 0-1 images. A 0-1 image is
rescaled once; transformers with default arguments would rescale it twice (it expects
``do_rescale=False`` for such input), so for those arrays we equal transformers with ``do_rescale=False``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import AltCLIPError
from .image_formats import FormatRefused, open_image

__all__ = ["AltCLIPImageProcessor", "ImageLoadError", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP's statistics; BAAI/AltCLIP's preprocessor_config.json uses the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Any]  # Any: torch.Tensor, imported lazily


class ImageLoadError(AltCLIPError):
    """An image could not be opened or decoded (missing, corrupt, truncated, or not an image)."""


def _size_dict(value, *, square: bool, name: str) -> dict[str, int]:
    """Read a ``size``/``crop_size`` field in any of the forms preprocessor configs use."""
    if isinstance(value, int) and not isinstance(value, bool):
        # Old feature-extractor configs (BAAI/AltCLIP's among them) store a bare int: CLIP reads a bare
        # ``size`` as the shortest edge and a bare ``crop_size`` as a square.
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"} or set(value) == {"height", "width"}:
            return {k: int(v) for k, v in value.items()}
    raise AltCLIPError(
        f"preprocessor {name} must be an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {value!r}"
    )


class AltCLIPImageProcessor:
    """Turns images into ``pixel_values`` exactly as transformers' PIL ``CLIPImageProcessor`` (see module doc)."""

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: int | dict[str, int] = 224,
        resample: int = Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        crop_size: int | dict[str, int] = 224,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        exif_transpose: bool = True,
        fast_decode: bool = False,
        image_size: int | None = None,
    ):
        if image_size is not None:
            # Another input size for the model (which then interpolates its position embeddings):
            # the shortest edge is resized to it and a square of it is cropped from the centre.
            if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
                raise AltCLIPError(f"image_size must be a positive integer, got {image_size!r}")
            do_resize, size, do_center_crop, crop_size = True, {"shortest_edge": image_size}, True, image_size
        self.do_resize = bool(do_resize)
        self.size = _size_dict(size, square=False, name="size")
        self.resample = Image.Resampling(int(resample))
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _size_dict(crop_size, square=True, name="crop_size")
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = tuple(float(m) for m in _per_channel(image_mean, "image_mean"))
        self.image_std = tuple(float(s) for s in _per_channel(image_std, "image_std"))
        if any(s == 0 for s in self.image_std):
            raise AltCLIPError(f"preprocessor image_std must not contain 0, got {self.image_std}")
        # do_convert_rgb=False only makes sense for inputs that are RGB already; AltCLIP's vision
        # tower takes 3 channels, so every input is brought to RGB regardless.
        self.do_convert_rgb = bool(do_convert_rgb)
        self.exif_transpose = bool(exif_transpose)
        self.fast_decode = bool(fast_decode)
        self._lut = self._build_lut()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides) -> "AltCLIPImageProcessor":
        known = {
            "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb",
        }
        kwargs = {k: v for k, v in config.items() if k in known and v is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **overrides) -> "AltCLIPImageProcessor":
        """Read ``preprocessor_config.json`` from a model directory or hub id."""
        from ..model_files import read_json, resolve_model_dir

        path = Path(resolve_model_dir(path_or_id)) / "preprocessor_config.json"
        if not path.is_file():
            raise AltCLIPError(f"{path.parent} has no preprocessor_config.json (needed to preprocess images)")
        return cls.from_dict(read_json(path), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": dict(self.size), "resample": int(self.resample),
            "do_center_crop": self.do_center_crop, "crop_size": dict(self.crop_size),
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
            "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
            "exif_transpose": self.exif_transpose, "fast_decode": self.fast_decode,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    # ------------------------------------------------------------------ the two halves

    def load_rgb(self, image: ImageInput) -> Image.Image:
        """Any accepted input -> an RGB PIL image, upright if ``exif_transpose``.

        Raises ``ImageLoadError`` for unreadable files; ``TypeError``/``ValueError`` for inputs
        that are not images at all (a programming error rather than a bad file).
        """
        if isinstance(image, (str, os.PathLike)):
            return self._pil_to_rgb(_open_image(image, self._draft_short_side() if self.fast_decode else None))
        if isinstance(image, Image.Image):
            return self._pil_to_rgb(image)
        if isinstance(image, np.ndarray) or _is_torch_tensor(image):
            return Image.fromarray(_array_to_rgb_uint8(image), mode="RGB")
        raise TypeError(
            f"images must be PIL images, paths, numpy arrays or torch tensors, got {type(image).__name__}"
        )

    def resize_and_crop(self, rgb: Image.Image) -> np.ndarray:
        """Resize and crop an RGB image; returns ``uint8 [3, H, W]``."""
        if self.do_resize:
            rgb = rgb.resize(self._resized_wh(rgb.width, rgb.height), resample=self.resample)
        array = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"])
        return np.ascontiguousarray(array)

    def prepare(self, image: ImageInput) -> np.ndarray:
        """Everything but rescaling and normalising: ``uint8 [3, H, W]``. What DataLoader workers run."""
        return self.resize_and_crop(self.load_rgb(image))

    def to_pixel_values(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """``uint8 [B, 3, H, W]`` (or a list of ``[3, H, W]``) -> normalised ``float32 [B, 3, H, W]``."""
        batch = np.stack(list(crops)) if not isinstance(crops, np.ndarray) else crops
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W], got {batch.dtype} {batch.shape}")
        out = np.empty(batch.shape, dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], batch[:, c], out=out[:, c])
        return out

    def to_pixel_values_torch(self, crops):
        """``to_pixel_values`` for a ``uint8 [B, 3, H, W]`` torch tensor, on its device: the same
        table, gathered there. Sending uint8 to a GPU moves a quarter of the bytes of float32,
        and the values are bit-identical to the numpy path."""
        import torch

        if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W], got {crops.dtype} {tuple(crops.shape)}")
        table = torch.from_numpy(self._lut).to(crops.device).view(-1)
        offsets = torch.arange(0, 3 * 256, 256, device=crops.device).view(1, 3, 1, 1)
        return table[crops.long() + offsets]

    def __call__(self, images: ImageInput | Sequence[ImageInput], return_tensors: str | None = "pt") -> dict:
        """``{"pixel_values": [B, 3, H, W]}`` for one image or a list of images."""
        if _is_single_image(images):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("images is empty")
        crops = [self.prepare(image) for image in images]
        shapes = {c.shape for c in crops}
        if len(shapes) > 1:
            raise ValueError(f"images came out with different sizes {sorted(shapes)}; enable center crop")
        return {"pixel_values": _as_tensors(self.to_pixel_values(crops), return_tensors)}

    # ------------------------------------------------------------------ details

    def _resized_wh(self, width: int, height: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            # transformers (after torchvision): the short side becomes `size`, the long side is
            # truncated, not rounded.
            target = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            return (target, new_long) if width <= height else (new_long, target)
        return self.size["width"], self.size["height"]

    def _draft_short_side(self) -> int:
        """The shortest side a reduced-scale JPEG decode may go down to: twice the resize target,
        so that the bicubic resize still has enough pixels to average over."""
        target = self.size.get("shortest_edge") or max(self.size["height"], self.size["width"])
        return 2 * target

    def _build_lut(self) -> np.ndarray:
        """Per channel, the float32 value each uint8 level ends as, computed as transformers does:
        ``float32(float64(v) * factor)`` then ``(x - mean) / std`` in float32."""
        levels = np.arange(256, dtype=np.float64)
        x = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        lut = np.empty((3, 256), dtype=np.float32)
        for c in range(3):
            if self.do_normalize:
                lut[c] = (x - np.float32(self.image_mean[c])) / np.float32(self.image_std[c])
            else:
                lut[c] = x
        return lut

    def _pil_to_rgb(self, image: Image.Image) -> Image.Image:
        try:
            if self.exif_transpose:
                image = ImageOps.exif_transpose(image)
            if image.mode in _SIXTEEN_BIT_MODES:
                wide = np.asarray(image).astype(np.uint32)
                image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            # Image.open only reads the header; a truncated or corrupt body fails here, on decode.
            name = getattr(image, "filename", "") or "image"
            raise ImageLoadError(f"{name}: cannot decode ({_reason(exc)})") from None


def _per_channel(values, name: str) -> tuple:
    if isinstance(values, (int, float)):
        return (values,) * 3
    values = tuple(values)
    if len(values) != 3:
        raise AltCLIPError(f"preprocessor {name} must have 3 values (RGB), got {values!r}")
    return values


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_image(path: str | os.PathLike, draft_short_side: int | None = None) -> Image.Image:
    try:
        image = open_image(path)
        if draft_short_side and image.format == "JPEG" and min(image.size) > draft_short_side:
            scale = draft_short_side / min(image.size)
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
    except FileNotFoundError:
        raise ImageLoadError(f"{os.fspath(path)}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{os.fspath(path)}: is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{os.fspath(path)}: not an image file pillow can read") from None
    except FormatRefused as exc:
        raise ImageLoadError(f"{os.fspath(path)}: {exc}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{os.fspath(path)}: cannot decode ({_reason(exc)})") from None
    return image


def _is_torch_tensor(x) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_single_image(x) -> bool:
    if isinstance(x, (str, os.PathLike, Image.Image)):
        return True
    if isinstance(x, np.ndarray) or _is_torch_tensor(x):
        return x.ndim <= 3
    return False


def _array_to_rgb_uint8(array) -> np.ndarray:
    """An image array in transformers' conventions -> ``uint8 [H, W, 3]`` (see module doc)."""
    if _is_torch_tensor(array):
        array = array.detach().cpu()
        if array.dtype.is_floating_point and array.element_size() < 4:
            array = array.float()  # numpy has no bfloat16; float32 holds bf16/fp16 values exactly
        array = array.numpy()
    array = np.asarray(array)
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"image arrays must hold integers or floats, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        if array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"cannot tell the channel axis of an image array of shape {array.shape}")
    else:
        raise ValueError(f"image arrays must be [H, W], [H, W, C] or [C, H, W], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array has an empty side: {array.shape}")

    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        # Same order of operations as transformers: blend onto white in the array's own range.
        is_int = np.issubdtype(array.dtype, np.integer)
        if not is_int and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"a 4-channel float image must lie in [0, 1], got [{array.min()}, {array.max()}]")
        white = 255 if is_int else 1.0
        alpha = array[..., 3:4] / white
        blended = alpha * array[..., :3] + (1 - alpha) * white
        array = np.round(blended).astype(array.dtype) if is_int else blended.astype(array.dtype)

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    # transformers' rule for turning an array into 8-bit pixels (`_rescale_for_pil_conversion`).
    if np.allclose(array, array.astype(int)):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer-valued image arrays must lie in [0, 255], got [{array.min()}, {array.max()}]")
        return np.ascontiguousarray(array.astype(np.uint8))
    if array.min() >= 0 and array.max() <= 1:
        return np.ascontiguousarray((array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8))
    raise ValueError(f"float image arrays must lie in [0, 1] (or be integers in [0, 255]), got [{array.min()}, {array.max()}]")


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center crop on ``[C, H, W]``, zero-padding an image smaller than the crop."""
    _, h, w = array.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return array[:, top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def _as_tensors(array: np.ndarray, return_tensors: str | None):
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(array)
    if return_tensors == "np":
        return array
    if return_tensors is None:
        return [a for a in array]
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
