"""The parity tests must be able to fail. Each case plants one classic AltCLIP bug in a copy of
``reference/modeling.py`` (a source mutation, so the real module needs no test hooks) and checks that
the parity assertions of ``parity_checks`` (test_parity's) reject the mutant, while the unmutated copy passes.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import altclip_fast.reference.modeling  # noqa: E402
from altclip_fast import reference  # noqa: E402
from tests.checkpoints import random_hf_model, save_hf, tiny_config  # noqa: E402
from tests.reference.parity_checks import TOL, assert_model_matches, inputs  # noqa: E402

SOURCE = Path(reference.modeling.__file__).read_text()

MUTANTS = {
    "position ids start at 0": (
        "return torch.cumsum(real, dim=1) * real + padding_idx",
        "return (torch.cumsum(real, dim=1) - 1) * real",
    ),
    "text pre_LN applied before the encoder": (
        "sequence, all_hidden, all_probs = self.roberta.encoder(hidden, mask)\n"
        "        projection_state = self.transformation(self.pre_LN(sequence))",
        "sequence, all_hidden, all_probs = self.roberta.encoder(self.pre_LN(hidden), mask)\n"
        "        projection_state = self.transformation(sequence)",
    ),
    "text LayerNorm on the branch instead of after the residual add": (
        "return self.LayerNorm(self.dense(hidden_states) + input_tensor)  # post-LN",
        "return self.LayerNorm(self.dense(hidden_states)) + input_tensor",
    ),
    "vision layers post-LN instead of pre-LN": (
        "attn_out, probs = self.self_attn(self.layer_norm1(hidden_states), mask)  # pre-LN\n"
        "        hidden_states = hidden_states + attn_out\n"
        "        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))",
        "attn_out, probs = self.self_attn(hidden_states, mask)\n"
        "        hidden_states = self.layer_norm1(hidden_states + attn_out)\n"
        "        hidden_states = self.layer_norm2(hidden_states + self.mlp(hidden_states))",
    ),
    "text pooling takes the last token": (
        "pooler_output=projection_state[:, 0]",
        "pooler_output=projection_state[:, -1]",
    ),
    "padding mask ignored": (
        "mask = additive_mask(attention_mask, hidden.dtype)",
        "mask = None",
    ),
    "tanh GELU instead of exact": (
        "self.act = ops.get_activation(config.hidden_act)\n\n    def forward(self, hidden_states):\n"
        "        return self.act(self.dense(hidden_states))",
        "self.act = lambda x: torch.nn.functional.gelu(x, approximate='tanh')\n\n    def forward(self, hidden_states):\n"
        "        return self.act(self.dense(hidden_states))",
    ),
}


def load_variant(name: str | None) -> types.ModuleType:
    source = SOURCE
    if name is not None:
        old, new = MUTANTS[name]
        assert old in source, f"mutation site for {name!r} not found in reference/modeling.py"
        source = source.replace(old, new)  # every occurrence: both post-LN sublayers of a text layer, say
    module = types.ModuleType(f"reference._mutant_{abs(hash(name))}")
    module.__package__ = "altclip_fast.reference"  # so `from . import ops` resolves
    exec(compile(source, f"<reference/modeling.py: {name}>", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config()
    hf = random_hf_model(config, seed=11)
    directory = save_hf(hf, tmp_path_factory.mktemp("hf"))
    batch = inputs(config, lengths=[5, 9, 3], images=3)
    with torch.no_grad():
        theirs = hf(**batch, output_hidden_states=True)
    return directory, batch, theirs, hf.logit_scale


@torch.no_grad()
def check(module, setup):
    directory, batch, theirs, logit_scale = setup
    ours = module.AltCLIPModel.from_pretrained(directory)
    assert_model_matches(ours(**batch, output_hidden_states=True), theirs, logit_scale, TOL)


def test_unmutated_copy_passes(setup):
    check(load_variant(None), setup)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name, setup):
    mutant = load_variant(name)  # outside the raises block: a missing mutation site must not count as caught
    with pytest.raises(AssertionError):
        check(mutant, setup)
