"""Where the model runs and how it is loaded, for every command: device and dtype choice, the model
directory check, model and processor loading, and the ``Session`` that holds them.

cli, serve, search, the embedding pipeline and the Ray actors all come here, so that ``--device
auto`` and ``--dtype auto`` mean the same everywhere (``altclip_fast.devices`` decides them) and no
module needs ``apps.cli``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

DEFAULT_MODEL = "BAAI/AltCLIP"
# The names --dtype accepts, besides auto (a subset of altclip_fast.dtypes.DTYPE_NAMES, which would
# import torch: the command-line parser is built without it).
DTYPE_CHOICES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def pick_device(name: str):
    import torch

    from ..devices import auto_device

    if name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device torch knows (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def pick_dtype(name: str, device):
    import torch

    from ..devices import auto_dtype
    from ..dtypes import resolve_dtype

    if name == "auto":
        return auto_dtype(device)
    dtype = resolve_dtype(name)
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("--dtype fp16 is not supported on CPU (use fp32 or bf16)")
    return dtype


def resolve_model(model: str) -> Path:
    """The model directory (hub ids are fetched); checked to hold weights before anything is loaded."""
    from ..errors import CheckpointError
    from ..model_files import WEIGHTS_FILES, find_weights, resolve_model_dir

    try:
        directory = resolve_model_dir(model)
    except CheckpointError as exc:  # no such directory, no network, no huggingface_hub: all fixable by the user
        raise UsageError(str(exc)) from None
    if not (directory / "config.json").is_file():
        raise UsageError(f"{model}: not a model directory (no config.json)")
    if find_weights(directory) is None:
        raise UsageError(f"{model}: the model directory has no weights (expected one of {', '.join(WEIGHTS_FILES)})")
    return directory


def load_model(model_dir: Path, device, dtype):
    """The fast AltCLIP model, loaded for inference."""
    from ..modeling.model import AltCLIPModel

    return AltCLIPModel.from_pretrained(model_dir, dtype=dtype, device=device).eval()


def load_processor(model_dir: Path, *, exif_transpose: bool = True, fast_decode: bool = False, image_size=None):
    from ..preprocessing.processor import AltCLIPProcessor

    return AltCLIPProcessor.from_pretrained(
        model_dir, exif_transpose=exif_transpose, fast_decode=fast_decode, image_size=image_size
    )


def check_image_size(image_size: int | None, model_dir: Path) -> None:
    """``--image-size`` must hold at least one patch of the model's vision tower."""
    if image_size is None:
        return
    from ..modeling.config import AltCLIPConfig

    patch = AltCLIPConfig.from_pretrained(model_dir).vision_config.patch_size
    if image_size < patch:
        raise UsageError(f"--image-size must be at least the model's patch size {patch}, got {image_size}")


@dataclass(frozen=True)
class SessionSettings:
    """What a session is made of, in plain values: what a Ray actor is sent to build its own copy."""

    model_dir: str
    device: str  # or "auto": decided where the session is built
    dtype: str  # a torch dtype's name ("float32", "bfloat16", "float16"), or "auto"
    image_size: int | None = None  # None: the model's own size
    exif_transpose: bool = True
    fast_decode: bool = False
    threads: int | None = None  # CPU: torch's thread count in this process (None: leave torch's choice)


@dataclass(eq=False)
class Session:
    """Model, processor, device and dtype of one command; the model loads on first use."""

    name: str  # the model as the user named it (a hub id or a directory), for messages
    model_dir: Path
    device: object  # torch.device
    dtype: object  # torch.dtype
    processor: object  # AltCLIPProcessor
    image_size: int | None = None
    _model: object = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args) -> Session:
        """From the common command-line options; every choice is checked before anything loads."""
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model_dir = resolve_model(args.model)
        # Another image size than the model's: the processor resizes and crops to it and the model
        # resizes its position embeddings to match (interpolate_pos_encoding).
        image_size = getattr(args, "image_size", None)
        check_image_size(image_size, model_dir)
        processor = load_processor(model_dir, exif_transpose=not args.no_exif_transpose,
                                   fast_decode=args.fast_decode, image_size=image_size)
        return cls(args.model, model_dir, device, dtype, processor, image_size)

    @classmethod
    def from_settings(cls, settings: SessionSettings) -> Session:
        """A session in another process (a Ray actor), from ``settings()`` of the driver's."""
        import torch

        from ..devices import auto_device, auto_dtype

        device = auto_device() if settings.device == "auto" else torch.device(settings.device)
        dtype = auto_dtype(device) if settings.dtype == "auto" else getattr(torch, settings.dtype)
        if settings.threads and device.type == "cpu":
            # The actor's CPU share, whatever OMP_NUM_THREADS Ray derived for it.
            torch.set_num_threads(settings.threads)
        model_dir = Path(settings.model_dir)
        processor = load_processor(model_dir, exif_transpose=settings.exif_transpose,
                                   fast_decode=settings.fast_decode, image_size=settings.image_size)
        return cls(settings.model_dir, model_dir, device, dtype, processor, settings.image_size)

    def settings(self, *, device: str | None = None, threads: int | None = None) -> SessionSettings:
        """This session as plain values (``device`` and ``threads``: where the copy runs)."""
        return SessionSettings(
            model_dir=str(self.model_dir.resolve()), device=device or str(self.device), dtype=self.dtype_name,
            image_size=self.image_size, exif_transpose=self.processor.image_processor.exif_transpose,
            fast_decode=self.processor.image_processor.fast_decode, threads=threads,
        )

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.model_dir, self.device, self.dtype)
        return self._model

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def interpolate_pos_encoding(self) -> bool:
        return self.image_size is not None

    def describe(self) -> str:
        import torch

        return f"{self.name} on {self.device} in {self.dtype_name}" + (
            f" with {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        )
