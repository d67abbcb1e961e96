"""The output containers behave like transformers' ModelOutput where user code relies on it."""

from __future__ import annotations

import pytest
import torch

from altclip_fast.modeling.outputs import AltCLIPOutput, BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndProjection


def test_access_by_attribute_name_and_index_skips_none():
    last, pooled = torch.zeros(1, 3, 4), torch.ones(1, 4)
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)
    assert out.pooler_output is pooled and out["last_hidden_state"] is last
    assert out[0] is last and out[1] is pooled and out[-1] is pooled
    assert out[:1] == (last,)
    assert out.keys() == ["last_hidden_state", "pooler_output"] and list(out) == out.keys()
    assert "hidden_states" not in out and len(out) == 2
    with pytest.raises(KeyError):
        out["hidden_states"]  # None fields are absent, as in transformers
    with pytest.raises(IndexError):
        out[2]


def test_tuple_conversion_nests_tower_outputs():
    text = BaseModelOutputWithPoolingAndProjection(torch.zeros(2, 5, 3), torch.zeros(2, 3), hidden_states=(torch.ones(1),))
    vision = BaseModelOutputWithPooling(torch.zeros(2, 7, 4), torch.zeros(2, 4))
    logits = torch.eye(2)
    out = AltCLIPOutput(logits_per_image=logits, logits_per_text=logits.t(), text_embeds=torch.zeros(2, 6),
                        image_embeds=torch.zeros(2, 6), text_model_output=text, vision_model_output=vision)
    as_tuple = out.to_tuple()
    assert len(as_tuple) == 6  # loss is None: skipped
    assert as_tuple[0] is logits
    assert as_tuple[4] == text.to_tuple() and len(as_tuple[4]) == 3
    assert as_tuple[5] == vision.to_tuple()
    assert out[4] == as_tuple[4]  # integer indexing goes through to_tuple, like transformers
    assert out["text_model_output"] is text  # by name: the object itself


def test_roberta_position_ids_count_real_tokens_from_pad_plus_one():
    from altclip_fast.modeling.model import roberta_position_ids

    ids = torch.tensor([[0, 5, 1, 7, 1], [0, 2, 2, 2, 2]])  # pad_token_id 1, also inside the first text
    assert roberta_position_ids(ids, 1).tolist() == [[2, 3, 1, 4, 1], [2, 3, 4, 5, 6]]


def test_clip_loss_matches_the_reference():
    from altclip_fast.modeling.model import clip_loss
    from altclip_fast.reference.modeling import clip_loss as reference_clip_loss

    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))  # [texts, images]
    torch.testing.assert_close(clip_loss(logits), reference_clip_loss(logits), rtol=0, atol=0)
    assert clip_loss(torch.eye(3) * 100).item() < 1e-6  # each text matches its own image
