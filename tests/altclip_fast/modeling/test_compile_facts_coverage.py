"""The compile facts cover what the model really launches.

``tests/kernels/test_compile_facts.py`` compiles a declared list of kernel launches at BAAI/AltCLIP's
shapes. Here the full-size model runs through the Triton backend with every kernel launch recorded
instead of run (so a forward costs seconds, not the interpreter's hours), in each dtype the model runs
on a GPU. Every launch must be in the list, with the pointer types it declares, and at least as
aligned as it declares: a launch that passes an unaligned row stride (the patch embedding's 588, before
it was padded) where the list compiles an aligned one fails here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import pytest
import torch

from altclip_fast.modeling.config import AltCLIPConfig
from altclip_fast.modeling.model import AltCLIPModel
from altclip_fast.ops.triton_backend import load_kernels
from tests.kernels import compile_facts

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="records launches on the interpreter's path (CPU)")

pytest.importorskip("triton")


class _Recorder:
    """Stands in for an interpreted kernel: ``kernel[grid](*args, **kwargs)`` records the arguments by name."""

    def __init__(self, name: str, kernel, launches: list):
        self.name, self.launches = name, launches
        self.arg_names = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, {**dict(zip(self.arg_names, args)), **kwargs}))
        return launch


@pytest.fixture(scope="module")
def full_size_model():
    load_kernels()  # defines the kernels (for the interpreter) before their launches are replaced
    with torch.device("cpu"):
        return AltCLIPModel(AltCLIPConfig(), backend="triton")


@contextlib.contextmanager
def _recording(launches: list):
    patch = pytest.MonkeyPatch()
    for name, attr in compile_facts.KERNELS.items():
        module = importlib.import_module(f"altclip_fast.kernels.{name}")
        patch.setattr(module, attr, _Recorder(name, getattr(module, attr), launches))
    try:
        yield
    finally:
        patch.undo()


def _inputs(config: AltCLIPConfig):
    # Texts of 5, 16, 23 and 77 tokens (pads = 1): packed text, and a padded grid for the pooled-only path.
    lengths = [5, 16, 23, 77]
    ids = torch.full((len(lengths), max(lengths)), config.text_config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 1000, (n,))
        mask[row, :n] = 1
    pixels = torch.randn(3, 3, config.vision_config.image_size, config.vision_config.image_size)
    return ids, mask, pixels


@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                                        (torch.float32, True)], ids=["bf16", "fp16", "fp32", "fp32-tf32"])
def test_every_launch_of_the_full_size_model_is_in_the_compile_facts(full_size_model, dtype, tf32):
    model = full_size_model.to(dtype)
    ids, mask, pixels = _inputs(model.config)
    launches = []
    was = torch.backends.cuda.matmul.allow_tf32  # read by the launchers, as F.linear reads it
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with _recording(launches), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # every token of both towers
            model.get_text_features(ids, mask)  # the pooled-only last layers
            model.get_image_features(pixels)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    kinds = {name for name, _ in launches}
    assert kinds == set(compile_facts.KERNELS), kinds
    listed = compile_facts.altclip_launches((dtype,))
    problems = sorted({p for name, args in launches for p in compile_facts.check_launch(name, args, listed)})
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_unaligned_patch_embedding(full_size_model, monkeypatch):
    """The check can fail: with the patch embedding's weight unpadded (588 in-features, rows not 16-element
    aligned), its launch is no longer one the compile facts declare."""
    from altclip_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "pad_in_features", lambda weight: weight)
    model = full_size_model.to(torch.bfloat16)
    model.prepare()
    ids, mask, pixels = _inputs(model.config)
    launches = []
    try:
        with _recording(launches), torch.no_grad():
            model.get_image_features(pixels)
    finally:
        monkeypatch.undo()
        model.prepare()
    listed = compile_facts.altclip_launches((torch.bfloat16,))
    problems = [p for name, args in launches for p in compile_facts.check_launch(name, args, listed)]
    assert any("EVEN_K" in p and "not in the compile facts" in p for p in problems), problems
