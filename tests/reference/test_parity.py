"""The reference AltCLIP against transformers' AltCLIPModel, in fp32, on random checkpoints written by
transformers' own ``save_pretrained`` and read back through our ``from_pretrained``.

Measured here (transformers 5.24, torch 2.13 CPU): tiny configs reach ~2e-7 relative error, the
full BAAI/AltCLIP-size model ~1e-6 (24 post-LN layers). The bounds leave a few-fold margin.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import altclip_fast.reference as reference  # noqa: E402
from altclip_fast.modeling.config import AltCLIPConfig  # noqa: E402
from tests.checkpoints import ODD_CONFIGS, make_text_batch, random_hf_model, save_hf  # noqa: E402
from tests.parity import rel_err  # noqa: E402
from tests.reference.parity_checks import (  # noqa: E402
    FULL_TOL,
    LENGTHS,
    TOL,
    assert_model_matches,
    assert_tower_matches,
    inputs,
)

CONFIGS = ODD_CONFIGS


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(config, transformers model, our reference model loaded from the saved directory)."""
    config = CONFIGS[request.param]
    hf = random_hf_model(config, seed=len(request.param))
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    ours = reference.AltCLIPModel.from_pretrained(directory)
    return config, hf, ours


@torch.no_grad()
def test_forward_matches_transformers(pair):
    config, hf, ours = pair
    batch = inputs(config, lengths=LENGTHS[:3])  # 3 texts x 3 images: the contrastive loss needs a square batch
    theirs = hf(**batch, return_loss=True, output_hidden_states=True)
    mine = ours(**batch, return_loss=True, output_hidden_states=True)
    assert_model_matches(mine, theirs, hf.logit_scale, TOL)
    assert abs(mine.loss.item() - theirs.loss.item()) < 1e-5 * max(1.0, abs(theirs.loss.item()))


@torch.no_grad()
def test_non_square_batch_and_left_padding(pair):
    config, hf, ours = pair
    batch = inputs(config, images=2)
    # Left-pad two rows: RoBERTa positions must still count real tokens only.
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for row in (0, 2):
        ids[row] = torch.roll(ids[row], int((1 - mask[row]).sum()))
        mask[row] = torch.roll(mask[row], int((1 - mask[row]).sum()))
    batch.update(input_ids=ids, attention_mask=mask)
    theirs = hf(**batch, output_hidden_states=True)
    mine = ours(**batch, output_hidden_states=True)
    assert mine.logits_per_image.shape == (2, len(LENGTHS))
    assert_model_matches(mine, theirs, hf.logit_scale, TOL)


@torch.no_grad()
def test_attentions_match_eager_transformers(pair):
    config, hf, ours = pair
    hf.set_attn_implementation("eager")  # sdpa cannot return attention maps
    try:
        batch = inputs(config)
        theirs = hf(**batch, output_attentions=True)
        mine = ours(**batch, output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")
    for tower in ("text_model_output", "vision_model_output"):
        a, b = mine[tower].attentions, theirs[tower].attentions
        assert len(a) == len(b) == getattr(config, tower.split("_")[0] + "_config").num_hidden_layers
        for layer, (x, y) in enumerate(zip(a, b)):
            # Padded keys get exactly zero weight in both; compare the real ones.
            assert rel_err(x, y) < TOL, f"{tower} layer {layer}"
    assert mine.text_model_output.hidden_states is None  # not requested


@torch.no_grad()
def test_return_dict_false_gives_transformers_tuples(pair):
    config, hf, ours = pair
    batch = inputs(config, lengths=LENGTHS[:3])
    theirs = hf(**batch, return_loss=True, return_dict=False)
    mine = ours(**batch, return_loss=True, return_dict=False)

    def flatten(x):
        return [t for item in x for t in flatten(item)] if isinstance(x, (tuple, list)) else [x]

    a, b = flatten(mine), flatten(theirs)
    assert isinstance(mine, tuple) and len(mine) == len(theirs) == 7  # loss + 4 tensors + 2 tower tuples
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"element {i}"
        assert (x - y).abs().max() < 1e-4 * max(1.0, y.abs().max().item()), f"element {i}"


@torch.no_grad()
def test_feature_getters_return_tensors(pair):
    config, hf, ours = pair
    batch = inputs(config)

    def tensor_of(x):  # transformers 5 returns an output object, transformers 4 a tensor
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    text = ours.get_text_features(batch["input_ids"], batch["attention_mask"])
    image = ours.get_image_features(batch["pixel_values"])
    assert isinstance(text, torch.Tensor) and text.shape == (len(LENGTHS), config.projection_dim)
    assert isinstance(image, torch.Tensor) and image.shape == (3, config.projection_dim)
    assert rel_err(text, tensor_of(hf.get_text_features(batch["input_ids"], batch["attention_mask"]))) < TOL
    assert rel_err(image, tensor_of(hf.get_image_features(batch["pixel_values"]))) < TOL


@torch.no_grad()
def test_explicit_position_ids_token_type_ids_and_inputs_embeds(pair, tmp_path):
    config, hf, ours = pair
    ids, mask = make_text_batch(config, [4, 7], seed=3)
    position_ids = torch.arange(2, 2 + ids.shape[1]).expand_as(ids).flip(1).contiguous()  # deliberately unusual
    token_type_ids = torch.zeros_like(ids)
    kwargs = dict(attention_mask=mask, position_ids=position_ids, token_type_ids=token_type_ids)
    theirs = hf.text_model(input_ids=ids, **kwargs)
    mine = ours.text_model(input_ids=ids, **kwargs)
    assert_tower_matches(mine, theirs, TOL, hidden_states=False)

    embeds = hf.text_model.roberta.embeddings.word_embeddings(ids)
    theirs = hf.text_model(inputs_embeds=embeds, attention_mask=mask)
    mine = ours.text_model(inputs_embeds=embeds, attention_mask=mask)
    assert_tower_matches(mine, theirs, TOL, hidden_states=False)


@torch.no_grad()
def test_towers_load_on_their_own(pair, tmp_path):
    config, hf, ours = pair
    directory = tmp_path / "full"
    save_hf(hf, directory)
    batch = inputs(config)
    text = reference.AltCLIPTextModel.from_pretrained(directory)
    vision = reference.AltCLIPVisionModel.from_pretrained(directory)
    assert_tower_matches(
        text(batch["input_ids"], batch["attention_mask"], output_hidden_states=True),
        hf.text_model(batch["input_ids"], batch["attention_mask"], output_hidden_states=True),
        TOL,
    )
    assert_tower_matches(
        vision(batch["pixel_values"], output_hidden_states=True),
        hf.vision_model(batch["pixel_values"], output_hidden_states=True),
        TOL,
    )
    # Checkpoints of a single tower, as transformers' tower classes save them.
    hf_text = transformers.AltCLIPTextModel(hf.config.text_config)
    hf_text.load_state_dict(hf.text_model.state_dict())
    save_hf(hf_text.eval(), tmp_path / "text")
    hf_vision = transformers.AltCLIPVisionModel(hf.config.vision_config)
    # transformers 4 nests the tower under .vision_model, transformers 5 does not.
    getattr(hf_vision, "vision_model", hf_vision).load_state_dict(hf.vision_model.state_dict())
    save_hf(hf_vision.eval(), tmp_path / "vision")
    text_alone = reference.AltCLIPTextModel.from_pretrained(tmp_path / "text")
    vision_alone = reference.AltCLIPVisionModel.from_pretrained(tmp_path / "vision")
    assert rel_err(text_alone(batch["input_ids"], batch["attention_mask"]).pooler_output,
                   text(batch["input_ids"], batch["attention_mask"]).pooler_output) == 0.0
    assert rel_err(vision_alone(batch["pixel_values"]).pooler_output,
                   vision(batch["pixel_values"]).pooler_output) == 0.0


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_baai_architecture(full_size_checkpoint):
    """The real BAAI/AltCLIP architecture (random weights): 24+24 layers, hidden 1024, 257 image tokens."""
    config = AltCLIPConfig()
    hf = transformers.AltCLIPModel.from_pretrained(full_size_checkpoint).eval()
    ours = reference.AltCLIPModel.from_pretrained(full_size_checkpoint)
    batch = inputs(config, lengths=[5, 12], images=2)
    theirs = hf(**batch, return_loss=True, output_hidden_states=True)
    mine = ours(**batch, return_loss=True, output_hidden_states=True)
    assert mine.vision_model_output.last_hidden_state.shape == (2, 257, 1024)
    assert len(mine.text_model_output.hidden_states) == 25
    assert_model_matches(mine, theirs, hf.logit_scale, FULL_TOL)
