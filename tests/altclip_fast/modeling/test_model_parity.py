"""The fast model against the reference (the oracle) and directly against transformers, in fp32 on CPU,
through the default CPU path (torch + oneDNN, unpadded text, fused QKV, folded quick_gelu).

Bound: relative error <= 1e-5 on embeddings and logits (issue 5). Measured here on the tiny configs:
~1e-7 to 1e-6. Per-token text outputs are compared on real tokens: the fast model never computes pad
positions (they are zeros) unless attentions are requested, when it runs padded like the reference.
"""

from __future__ import annotations

import pytest
import torch

import altclip_fast.reference as reference
from altclip_fast.modeling import model as fast
from altclip_fast.modeling.config import AltCLIPConfig
from altclip_fast.ops import onednn
from tests.checkpoints import MIXED_LENGTHS, ODD_CONFIGS, make_pixels, make_text_batch, random_hf_model, save_hf
from tests.parity import logits_err, rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # relative error: embeddings, pooled outputs, real-token states
LOGITS_TOL = 1e-5  # cosine units (tests/parity.py)

CONFIGS = ODD_CONFIGS
LENGTHS = MIXED_LENGTHS


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trio(request, tmp_path_factory):
    """(config, transformers model, reference model, fast model), all from one saved checkpoint."""
    config = CONFIGS[request.param]
    hf = random_hf_model(config, seed=3 + len(request.param))
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return (
        config,
        hf,
        reference.AltCLIPModel.from_pretrained(directory),
        fast.AltCLIPModel.from_pretrained(directory),
    )


def batch_of(config: AltCLIPConfig, lengths=LENGTHS, images: int = 3, seed: int = 1):
    ids, mask = make_text_batch(config, lengths, seed=seed)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(config, images, seed=seed + 1))


def assert_tower_close(ours, theirs, real=None, *, hidden_states=False):
    """``real``: [batch, seq] bool of the tokens to compare per-token outputs on (None: all)."""
    pick = (lambda t: t) if real is None else (lambda t: t[real])
    assert ours.last_hidden_state.shape == theirs.last_hidden_state.shape
    assert rel_err(pick(ours.last_hidden_state), pick(theirs.last_hidden_state)) < TOL
    assert rel_err(ours.pooler_output, theirs.pooler_output) < TOL
    if hidden_states:
        assert len(ours.hidden_states) == len(theirs.hidden_states)
        for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
            assert rel_err(pick(a), pick(b)) < TOL, f"hidden state {i}"


def assert_model_close(ours, theirs, logit_scale, real, *, hidden_states=False):
    assert logits_err(ours.logits_per_image, theirs.logits_per_image, logit_scale) < LOGITS_TOL
    assert logits_err(ours.logits_per_text, theirs.logits_per_text, logit_scale) < LOGITS_TOL
    assert rel_err(ours.text_embeds, theirs.text_embeds) < TOL
    assert rel_err(ours.image_embeds, theirs.image_embeds) < TOL
    assert_tower_close(ours.text_model_output, theirs.text_model_output, real, hidden_states=hidden_states)
    assert_tower_close(ours.vision_model_output, theirs.vision_model_output, hidden_states=hidden_states)


def test_fast_path_is_what_runs(trio):
    """The parity below is about the fast path: unpadded text and, on CPU, oneDNN GEMMs."""
    config, _, _, ours = trio
    batch = batch_of(config)
    out = ours.text_model(batch["input_ids"], batch["attention_mask"])
    pads = ~batch["attention_mask"].bool()
    assert pads.any() and out.last_hidden_state[pads].abs().max() == 0  # never computed
    assert ours.vision_model.layers[0].qkv.weight.shape[0] == 3 * config.vision_config.hidden_size


@torch.no_grad()
def test_forward_matches_reference_and_transformers(trio):
    config, hf, ref, ours = trio
    batch = batch_of(config, lengths=LENGTHS[:3])  # square: the loss needs it
    mine = ours(**batch, return_loss=True, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    for oracle in (ref(**batch, return_loss=True, output_hidden_states=True),
                   hf(**batch, return_loss=True, output_hidden_states=True)):
        assert_model_close(mine, oracle, hf.logit_scale, real, hidden_states=True)
        assert abs(mine.loss.item() - oracle.loss.item()) < 1e-5 * max(1.0, abs(oracle.loss.item()))


@torch.no_grad()
@pytest.mark.parametrize("library", ["onednn", "blas"])
def test_both_cpu_fp32_gemm_libraries_match(trio, library, monkeypatch):
    """fp32 GEMMs run on oneDNN's fused linear or torch's BLAS, whichever this CPU runs faster
    (ops/cpu_fp32_gemm.py): each, forced, stays within the bound, and is the one that runs."""
    config, hf, ref, ours = trio
    if library == "onednn" and not onednn.fused_linear_works(torch.float32):
        pytest.skip("oneDNN's fused linear is unavailable in this torch build")
    real_op, calls = onednn.fused_linear(), []

    class Spy:  # records the input dtype of each oneDNN GEMM
        def __call__(self, *args):
            return calls.append(args[0].dtype) or real_op(*args)

        def binary(self, *args):
            return calls.append(args[0].dtype) or real_op.binary(*args)

    monkeypatch.setattr(onednn, "fused_linear", Spy)
    monkeypatch.setenv("ALTCLIP_FAST_CPU_FP32_GEMM", library)
    try:
        ours.backend = ours.backend  # re-resolves the op set: the variable is read now
        batch = batch_of(config, lengths=LENGTHS[:3])
        mine = ours(**batch)
        assert_model_close(mine, ref(**batch), hf.logit_scale, batch["attention_mask"].bool())
        assert (torch.float32 in calls) == (library == "onednn")
    finally:
        monkeypatch.undo()
        ours.backend = ours.backend


@torch.no_grad()
def test_feature_getters_match(trio):
    config, hf, ref, ours = trio
    batch = batch_of(config, seed=5)
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    text, image = ours.get_text_features(ids, mask), ours.get_image_features(px)
    assert isinstance(text, torch.Tensor) and text.shape == (len(LENGTHS), config.projection_dim)
    assert isinstance(image, torch.Tensor) and image.shape == (3, config.projection_dim)
    assert rel_err(text, ref.get_text_features(ids, mask)) < TOL
    assert rel_err(image, ref.get_image_features(px)) < TOL
    assert rel_err(text, hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output) < TOL
    assert rel_err(image, hf.get_image_features(pixel_values=px).pooler_output) < TOL


@torch.no_grad()
def test_left_padding_and_no_mask(trio):
    """Left padding puts a pad at the pooled position 0: the fast model falls back to the padded
    computation and must still agree everywhere, pads included."""
    config, hf, ref, ours = trio
    batch = batch_of(config, images=2, seed=7)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for row in (0, 2):
        shift = int((1 - mask[row]).sum())
        ids[row], mask[row] = torch.roll(ids[row], shift), torch.roll(mask[row], shift)
    batch.update(input_ids=ids, attention_mask=mask)
    assert_model_close(ours(**batch, output_hidden_states=True), ref(**batch, output_hidden_states=True),
                       hf.logit_scale, None, hidden_states=True)
    # No mask at all: every token, pads included, is attended (as transformers does).
    del batch["attention_mask"]
    assert_model_close(ours(**batch), ref(**batch), hf.logit_scale, None)


@torch.no_grad()
def test_attentions_match_reference(trio):
    """output_attentions takes the explicit-attention path (padded text)."""
    config, hf, ref, ours = trio
    batch = batch_of(config, seed=9)
    mine = ours(**batch, output_attentions=True, output_hidden_states=True)
    theirs = ref(**batch, output_attentions=True, output_hidden_states=True)
    assert_model_close(mine, theirs, hf.logit_scale, None, hidden_states=True)
    for tower in ("text_model_output", "vision_model_output"):
        a, b = mine[tower].attentions, theirs[tower].attentions
        assert len(a) == len(b) > 0
        for layer, (x, y) in enumerate(zip(a, b)):
            assert rel_err(x, y) < TOL, f"{tower} layer {layer}"
    assert ours(**batch).text_model_output.attentions is None


@torch.no_grad()
def test_return_dict_false_gives_the_same_tuples(trio):
    config, _, ref, ours = trio
    batch = batch_of(config, lengths=LENGTHS[:3])
    mine = ours(**batch, return_loss=True, return_dict=False)
    theirs = ref(**batch, return_loss=True, return_dict=False)

    def flatten(x):
        return [t for item in x for t in flatten(item)] if isinstance(x, tuple) else [x]

    assert isinstance(mine, tuple) and len(mine) == len(theirs) == 7
    a, b = flatten(mine), flatten(theirs)
    assert [t.shape for t in a] == [t.shape for t in b]
    # Text per-token states differ at pads (zeros here): compare the rest exactly by position.
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape[:2] == batch["input_ids"].shape:
            real = batch["attention_mask"].bool()
            x, y = x[real], y[real]
        assert rel_err(x, y) < TOL, f"element {i}"


@torch.no_grad()
def test_position_ids_token_type_ids_and_inputs_embeds(trio):
    config, hf, ref, ours = trio
    ids, mask = make_text_batch(config, [4, 7, 2], seed=3)
    real = mask.bool()
    position_ids = torch.arange(2, 2 + ids.shape[1]).expand_as(ids).flip(1).contiguous()  # deliberately unusual
    kwargs = dict(attention_mask=mask, position_ids=position_ids, token_type_ids=torch.zeros_like(ids))
    assert_tower_close(ours.text_model(input_ids=ids, **kwargs), ref.text_model(input_ids=ids, **kwargs), real)
    embeds = hf.text_model.roberta.embeddings.word_embeddings(ids)
    assert_tower_close(ours.text_model(inputs_embeds=embeds, attention_mask=mask),
                       ref.text_model(inputs_embeds=embeds, attention_mask=mask), real)


@torch.no_grad()
def test_towers_load_and_run_on_their_own(trio, tmp_path):
    config, hf, ref, ours = trio
    directory = save_hf(hf, tmp_path / "full")
    batch = batch_of(config, seed=11)
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    text = fast.AltCLIPTextModel.from_pretrained(directory)
    vision = fast.AltCLIPVisionModel.from_pretrained(directory)
    assert_tower_close(text(ids, mask, output_hidden_states=True),
                       ref.text_model(ids, mask, output_hidden_states=True), mask.bool(), hidden_states=True)
    assert_tower_close(vision(px, output_hidden_states=True),
                       ref.vision_model(px, output_hidden_states=True), hidden_states=True)
    # Single-tower checkpoints, as transformers' tower classes save them.
    hf_text = transformers.AltCLIPTextModel(hf.config.text_config)
    hf_text.load_state_dict(hf.text_model.state_dict())
    hf_vision = transformers.AltCLIPVisionModel(hf.config.vision_config)
    getattr(hf_vision, "vision_model", hf_vision).load_state_dict(hf.vision_model.state_dict())
    text_alone = fast.AltCLIPTextModel.from_pretrained(save_hf(hf_text.eval(), tmp_path / "text"))
    vision_alone = fast.AltCLIPVisionModel.from_pretrained(save_hf(hf_vision.eval(), tmp_path / "vision"))
    assert torch.equal(text_alone(ids, mask).pooler_output, text(ids, mask).pooler_output)
    assert torch.equal(vision_alone(px).pooler_output, vision(px).pooler_output)


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_baai_architecture(full_size_checkpoint):
    """The real BAAI/AltCLIP architecture (random weights), tiny batch: 24+24 layers, 257 image tokens."""
    config, directory = AltCLIPConfig(), full_size_checkpoint
    ref = reference.AltCLIPModel.from_pretrained(directory)
    ours = fast.AltCLIPModel.from_pretrained(directory)
    batch = batch_of(config, lengths=[5, 12], images=2)
    mine, theirs = ours(**batch), ref(**batch)
    assert mine.vision_model_output.last_hidden_state.shape == (2, 257, 1024)
    assert_model_close(mine, theirs, ref.logit_scale, batch["attention_mask"].bool())
    # The pooled-only path (CLS-only last layer) against the reference's full computation.
    assert rel_err(ours.get_image_features(batch["pixel_values"]),
                   ref.visual_projection(theirs.vision_model_output.pooler_output)) < TOL
    assert rel_err(ours.get_text_features(batch["input_ids"], batch["attention_mask"]),
                   ref.text_projection(theirs.text_model_output.pooler_output)) < TOL
