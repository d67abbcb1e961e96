"""Unpadded text and the CLS-only last layer must be invisible: a text's embedding does not depend on
its batch or on the padding around it, and the pooled-only getters equal the full forward."""

from __future__ import annotations

import pytest
import torch

from altclip_fast.modeling import model as fast
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import rel_err

pytest.importorskip("transformers")

CONFIG = tiny_config(text_hidden=48, text_heads=3, layers=3)
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = save_hf(random_hf_model(CONFIG, seed=21), tmp_path_factory.mktemp("inv"))
    return fast.AltCLIPModel.from_pretrained(directory)


def test_a_text_alone_equals_the_same_text_in_a_padded_batch(model):
    lengths = [7, 2, 13, 1, 9, 13, 4]
    ids, mask = make_text_batch(CONFIG, lengths, seed=4)
    together = model.get_text_features(ids, mask)
    for row, n in enumerate(lengths):
        alone = model.get_text_features(ids[row : row + 1, :n], mask[row : row + 1, :n])
        assert rel_err(together[row : row + 1], alone) < TOL, f"text {row}"
        # More padding than any text in the batch needs changes nothing either.
        wide_ids = torch.full((1, 20), CONFIG.text_config.pad_token_id)
        wide_mask = torch.zeros((1, 20), dtype=torch.long)
        wide_ids[0, :n], wide_mask[0, :n] = ids[row, :n], 1
        assert rel_err(model.get_text_features(wide_ids, wide_mask), alone) < TOL


def test_position_ids_match_roberta_on_the_padded_grid(model):
    """Pads inside the text (pad ids with mask 1) keep position padding_idx, as RoBERTa does; the
    packed path must reproduce that, so compare against the padded path, which runs when attentions
    are requested."""
    ids, mask = make_text_batch(CONFIG, [8, 5, 8], seed=6)
    ids[0, 3] = CONFIG.text_config.pad_token_id  # a pad token that is attended
    mask[2, 4] = 0  # and a hole in a mask: a real token that is not attended
    packed = model.text_model(ids, mask)
    padded = model.text_model(ids, mask, output_attentions=True)
    real = mask.bool()
    assert rel_err(packed.pooler_output, padded.pooler_output) < TOL
    assert rel_err(packed.last_hidden_state[real], padded.last_hidden_state[real]) < TOL


def test_pooled_only_getters_equal_the_full_forward(model):
    ids, mask = make_text_batch(CONFIG, [3, 11, 6], seed=8)
    pixels = make_pixels(CONFIG, 3, seed=9)
    text = model.text_model(ids, mask).pooler_output
    image = model.vision_model(pixels).pooler_output
    assert rel_err(model.get_text_features(ids, mask), model.text_projection(text)) < TOL
    assert rel_err(model.get_image_features(pixels), model.visual_projection(image)) < TOL
