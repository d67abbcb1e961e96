"""``ServedModel``: the model and processor as the server uses them. ``tokenize`` runs in the prep
threads, each with its own tokenizer (``tokens.TextTokens``: no lock, long texts cut before they are
tokenized, token arrays checked and truncated alike); ``run_batch`` (the batcher's batch function) and ``probe`` run in the one thread that owns the
model. Rows come back L2-normalised as float32; a batch with non-finite rows fails as a whole.
"""

from __future__ import annotations

import os

import numpy as np

from .. import faults
from .batching import BatchFailed
from .tokens import TextTokens

__all__ = ["ServedModel", "available_cpus", "model_threads", "use_model_threads"]


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def model_threads(requested: int, cpus: int, current: int) -> int | None:
    """The forward pass's thread count for ``--threads requested`` on ``cpus`` cores, torch's count being
    ``current``; ``None``: leave it.

    0 (the default) leaves torch's choice (OpenMP's: a thread per core of the affinity mask) unless it
    exceeds ``cpus`` (``OMP_NUM_THREADS`` set larger, say): more threads than cores stall at every
    parallel step, each waiting for a preempted one. Leaving one core of two to the event loop, the prep
    threads and the clients was measured: on 2 cores that other work shared, 32 clients got the same
    throughput from 1 thread as from 2, while 2 threads ran twice as fast whenever the second core was
    free, so the default stays torch's (bench/RESULTS.md, "Where the server's text throughput goes")."""
    if requested:
        return requested
    return cpus if current > cpus else None


def use_model_threads(requested: int, device) -> int | None:
    """Sets torch's CPU thread count for the forward pass (``--threads``); returns it (``None``: unchanged,
    as on a GPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        return None
    threads = model_threads(requested, available_cpus(), torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


class ServedModel:
    """The model, the processor and the batch function the batcher calls (in the model thread)."""

    def __init__(self, model, processor, *, device, dtype, interpolate_pos_encoding: bool = False):
        import torch

        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.dim = int(model.config.projection_dim)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.tokens = TextTokens(processor.tokenizer)
        # Token ids a client may send: what both the tokenizer and the embedding table know.
        self.vocab_size = min(processor.tokenizer.vocab_size, int(model.config.text_config.vocab_size))
        self._torch = torch

    @classmethod
    def from_session(cls, session) -> ServedModel:
        return cls(session.model, session.processor, device=session.device, dtype=session.dtype,
                   interpolate_pos_encoding=session.interpolate_pos_encoding)

    def tokenize(self, items: list) -> list[list[int]]:
        """Token ids of texts or token arrays, truncated to what the model embeds, as the CLI truncates."""
        return self.tokens(items)

    def prepare_image(self, image) -> np.ndarray:
        """A decoded image -> the processor's ``uint8 [3, H, W]`` crop."""
        return self.processor.image_processor.prepare(image)

    def run_batch(self, kind: str, payloads: list) -> np.ndarray:
        torch = self._torch
        faults.slow_forward()
        with torch.inference_mode():
            out = self._text(payloads) if kind == "text" else self._images(payloads)
            out = out.float()
            out = out / out.norm(dim=-1, keepdim=True)
            rows = out.cpu().numpy()
        if not np.isfinite(rows).all():
            raise BatchFailed("the model produced non-finite embeddings")
        return rows

    def _text(self, payloads: list[list[int]]):
        torch = self._torch
        pad = self.processor.tokenizer.pad_token_id
        length = max(len(ids) for ids in payloads)
        ids = torch.full((len(payloads), length), pad, dtype=torch.long)
        mask = torch.zeros((len(payloads), length), dtype=torch.long)
        for row, seq in enumerate(payloads):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        # Right padding with a mask: the text tower runs the real tokens packed, no padding.
        return self.model.get_text_features(ids.to(self.device), mask.to(self.device))

    def _images(self, payloads: list[np.ndarray]):
        pixels = self.processor.image_processor.to_pixel_values(np.stack(payloads))
        pixels = self._torch.from_numpy(pixels).to(self.device, self.dtype)
        return self.model.get_image_features(pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)

    def probe(self) -> None:
        """A real tiny forward through both towers; raises if the model does not work."""
        crop = self.prepare_image(np.full((16, 16, 3), 128, dtype=np.uint8))
        self.run_batch("text", self.tokenize(["health check"]))
        self.run_batch("image", [crop])
