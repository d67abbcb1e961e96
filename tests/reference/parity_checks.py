"""The parity assertions the reference's tests share: the tolerances, the inputs, and what "matches
transformers" means for a whole model and for one tower (test_parity uses them on the real reference,
test_parity_catches_bugs on mutants of it)."""

from __future__ import annotations

from altclip_fast.modeling.config import AltCLIPConfig
from tests.checkpoints import MIXED_LENGTHS, make_pixels, make_text_batch
from tests.parity import logits_err, rel_err

TOL = 2e-6  # relative error, every tensor
FULL_TOL = 5e-6
LOGITS_TOL = 1e-6  # cosine units
LENGTHS = MIXED_LENGTHS


def inputs(config: AltCLIPConfig, lengths=LENGTHS, images: int = 3):
    ids, mask = make_text_batch(config, lengths, seed=1)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(config, images, seed=2))


def assert_tower_matches(ours, theirs, tol, *, hidden_states=True):
    assert rel_err(ours.last_hidden_state, theirs.last_hidden_state) < tol
    assert rel_err(ours.pooler_output, theirs.pooler_output) < tol
    if hidden_states:
        assert len(ours.hidden_states) == len(theirs.hidden_states)
        for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
            assert rel_err(a, b) < tol, f"hidden state {i}"


def assert_model_matches(ours, theirs, logit_scale, tol):
    # Square batches make logits_per_image and logits_per_text the same shape: compare by name.
    assert logits_err(ours.logits_per_image, theirs.logits_per_image, logit_scale) < LOGITS_TOL
    assert logits_err(ours.logits_per_text, theirs.logits_per_text, logit_scale) < LOGITS_TOL
    assert rel_err(ours.text_embeds, theirs.text_embeds) < tol
    assert rel_err(ours.image_embeds, theirs.image_embeds) < tol
    assert_tower_matches(ours.text_model_output, theirs.text_model_output, tol)
    assert_tower_matches(ours.vision_model_output, theirs.vision_model_output, tol)
