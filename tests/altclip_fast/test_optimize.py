"""altclip_fast.optimize: patches a loaded transformers AltCLIP in place, one switch per kernel, and the
outputs stay within the parity bounds (fp32: relative error <= 1e-5; bf16: <= 2x transformers' own
bf16 error against fp32)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import altclip_fast
from altclip_fast.ops.torch_backend import TorchOps
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-5
CONFIG = tiny_config(text_hidden=60, text_heads=3, vision_hidden=80, vision_heads=5, image_size=50, patch_size=7)


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(CONFIG, seed=11)


@pytest.fixture(scope="module")
def batch():
    ids, mask = make_text_batch(CONFIG, [5, 9, 3, 1], seed=2)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2, seed=3))


@pytest.fixture(scope="module")
def expected(hf, batch):
    with torch.no_grad():
        return hf(**batch, output_hidden_states=True)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the torch backend's ops, to prove the patched code is what runs."""
    calls = collections.Counter()
    for name in ("linear", "layer_norm", "add_layer_norm", "linear_add_layer_norm", "attention"):
        original = getattr(TorchOps, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TorchOps, name, counted)
    return calls


def assert_close(out, expected, tol=TOL):
    assert rel_err(out.logits_per_image, expected.logits_per_image) < tol
    assert rel_err(out.text_embeds, expected.text_embeds) < tol
    assert rel_err(out.image_embeds, expected.image_embeds) < tol
    for tower in ("text_model_output", "vision_model_output"):
        assert rel_err(out[tower].last_hidden_state, expected[tower].last_hidden_state) < tol
        for a, b in zip(out[tower].hidden_states or (), expected[tower].hidden_states or ()):
            assert rel_err(a, b) < tol


SWITCHES = [
    dict(attention=True, layer_norm=True, mlp=True),
    dict(attention=True, layer_norm=False, mlp=False),
    dict(attention=False, layer_norm=True, mlp=False),
    dict(attention=False, layer_norm=False, mlp=True),
    dict(attention=False, layer_norm=True, mlp=True),  # the vision layer hands its residual to the MLP
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "+".join(k for k, v in s.items() if v))
@torch.no_grad()
def test_each_switch_patches_in_place_and_keeps_parity(hf, batch, expected, op_calls, switches):
    model = copy.deepcopy(hf)
    assert altclip_fast.optimize(model, **switches) is model
    assert_close(model(**batch, output_hidden_states=True), expected)
    layers = CONFIG.text_config.num_hidden_layers  # same in both towers here
    if switches["attention"]:
        assert op_calls["attention"] == 2 * layers
    else:
        assert op_calls["attention"] == 0
    if switches["layer_norm"]:
        # text: 2 fused dense+add+LN per layer; vision: LN1 per layer, plus the 4 standalone norms
        assert op_calls["linear_add_layer_norm"] == 2 * layers
        assert op_calls["add_layer_norm"] == layers
        assert op_calls["layer_norm"] == layers + 4
    else:
        assert op_calls["layer_norm"] == op_calls["add_layer_norm"] == op_calls["linear_add_layer_norm"] == 0


@torch.no_grad()
def test_switching_off_restores_transformers_code(hf, batch, op_calls):
    model = copy.deepcopy(hf)
    altclip_fast.optimize(model)
    altclip_fast.optimize(model, attention=False, layer_norm=False, mlp=False)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any("_altclip_fast" in name for name, _ in model.named_buffers())
    assert "altclip_fast" not in repr(model)
    model(**batch)
    assert sum(op_calls.values()) == 0
    # Patching twice is the same as patching once.
    altclip_fast.optimize(model)
    altclip_fast.optimize(model)
    model(**batch)
    assert op_calls["attention"] == 2 * CONFIG.text_config.num_hidden_layers


@torch.no_grad()
def test_towers_alone_and_state_dict_unchanged(hf, batch):
    text = transformers.AltCLIPTextModel(hf.config.text_config).eval()
    text.load_state_dict(hf.text_model.state_dict())
    vision = transformers.AltCLIPVisionModel(hf.config.vision_config).eval()
    vision.load_state_dict(hf.vision_model.state_dict())
    want_text = text(batch["input_ids"], batch["attention_mask"]).pooler_output
    want_vision = vision(batch["pixel_values"]).pooler_output
    keys = set(text.state_dict())
    altclip_fast.optimize(text)
    altclip_fast.optimize(vision)
    assert set(text.state_dict()) == keys  # the fused QKV copy is not saved
    assert rel_err(text(batch["input_ids"], batch["attention_mask"]).pooler_output, want_text) < TOL
    assert rel_err(vision(batch["pixel_values"]).pooler_output, want_vision) < TOL


@torch.no_grad()
def test_bf16_within_twice_transformers_error(hf, batch, expected):
    """Low precision: error vs the fp32 answer <= 2x transformers' own bf16 error (+ a small floor)."""
    plain = copy.deepcopy(hf).to(torch.bfloat16)
    fast = altclip_fast.optimize(copy.deepcopy(hf).to(torch.bfloat16))
    lowp = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
    theirs, ours = plain(**lowp), fast(**lowp)
    for name in ("text_embeds", "image_embeds"):
        assert rel_err(ours[name], expected[name]) <= 2 * rel_err(theirs[name], expected[name]) + 1e-3, name


@torch.no_grad()
def test_triton_backend_through_the_interpreter(hf, batch, expected):
    """The patched model driven through the Triton kernels (interpreter on CPU, compiled on CUDA), fp32."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = altclip_fast.optimize(copy.deepcopy(hf).to(device), backend="triton")
    assert_close(model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True), expected, tol=1e-5)


def test_rejects_other_models_and_bad_backend(hf):
    with pytest.raises(TypeError, match="AltCLIPModel"):
        altclip_fast.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        altclip_fast.optimize(copy.deepcopy(hf), backend="cuda-magic")


def test_attention_weights_requests_use_transformers_attention(hf, batch):
    model = copy.deepcopy(hf)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(**batch, output_attentions=True)
        altclip_fast.optimize(model)
        got = model(**batch, output_attentions=True)
    for tower in ("text_model_output", "vision_model_output"):
        assert len(got[tower].attentions) == CONFIG.text_config.num_hidden_layers
        for a, b in zip(got[tower].attentions, want[tower].attentions):
            assert rel_err(a, b) < TOL


def test_module_import_does_not_shadow_the_function(hf):
    import altclip_fast.optimize  # noqa: F401  (rebinds the package attribute to the module)

    model = copy.deepcopy(hf)
    assert altclip_fast.optimize(model, mlp=False) is model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_gpu_bf16_through_the_kernels(hf, batch, expected):
    plain = copy.deepcopy(hf).to("cuda", torch.bfloat16)
    fast = altclip_fast.optimize(copy.deepcopy(hf).to("cuda", torch.bfloat16))
    lowp = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    theirs, ours = plain(**lowp), fast(**lowp)
    for name in ("text_embeds", "image_embeds"):
        assert rel_err(ours[name].cpu(), expected[name]) <= 2 * rel_err(theirs[name].cpu(), expected[name]) + 1e-3


def test_patched_modules_say_so_in_their_repr(hf, monkeypatch):
    """Like Liger-Kernel: a patched module's repr names the switch and the backend it runs."""
    monkeypatch.delenv("ALTCLIP_FAST_BACKEND", raising=False)
    model = altclip_fast.optimize(copy.deepcopy(hf), layer_norm=False)
    text = repr(model)
    assert "altclip_fast: attention patched (backend torch)" in text
    assert "altclip_fast: mlp patched (backend torch)" in text
    assert "layer_norm patched" not in text
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert repr(norm) == repr(torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps))


# --------------------------------------------------------------------------- weights as they are now


def unpatched_copy(model):
    """The same weights run by transformers' own code: what a patched model must answer."""
    return altclip_fast.optimize(copy.deepcopy(model), attention=False, layer_norm=False, mlp=False)


def attention_modules(model):
    from transformers.models.altclip import modeling_altclip as m

    return [mod for mod in model.modules() if isinstance(mod, (m.AltRobertaSelfAttention, m.AltCLIPAttention))]


@pytest.fixture(scope="module")
def saved_dir(hf, tmp_path_factory):
    return save_hf(hf, tmp_path_factory.mktemp("hf_checkpoint"))


@pytest.mark.parametrize("when", ["before", "during", "after"])
@torch.no_grad()
def test_patch_before_during_and_after_loading(hf, batch, expected, saved_dir, op_calls, monkeypatch, when):
    if when == "before":
        model = altclip_fast.optimize(transformers.AltCLIPModel(hf.config).eval())
        model(**batch)  # a forward before loading must not leave stale fused weights behind
        model.load_state_dict(hf.state_dict())
    elif when == "during":
        # Patched inside __init__: from_pretrained builds the model on the meta device, then loads the
        # weights into the already patched modules.
        original_init = transformers.AltCLIPModel.__init__

        def patched_init(self, config, *args, **kwargs):
            original_init(self, config, *args, **kwargs)
            altclip_fast.optimize(self)

        monkeypatch.setattr(transformers.AltCLIPModel, "__init__", patched_init)
        model = transformers.AltCLIPModel.from_pretrained(saved_dir).eval()
        assert next(model.parameters()).device.type == "cpu"
        assert any("forward" in mod.__dict__ for mod in model.modules())
    else:
        model = altclip_fast.optimize(transformers.AltCLIPModel.from_pretrained(saved_dir).eval())
    op_calls.clear()
    assert_close(model(**batch, output_hidden_states=True), expected)
    assert op_calls["attention"] == 2 * CONFIG.text_config.num_hidden_layers


@torch.no_grad()
def test_load_state_dict_after_patching_uses_the_new_weights(hf, batch, expected):
    other = random_hf_model(CONFIG, seed=12)
    model = altclip_fast.optimize(copy.deepcopy(other))
    model(**batch)
    model.load_state_dict(hf.state_dict())
    assert_close(model(**batch, output_hidden_states=True), expected)
    # and assign=True, which replaces the parameter objects instead of copying into them
    model.load_state_dict(other.state_dict(), assign=True)
    assert_close(model(**batch, output_hidden_states=True), other(**batch, output_hidden_states=True))


def test_in_place_changes_init_weights_and_optimizer_steps_are_seen(hf, batch):
    model = altclip_fast.optimize(copy.deepcopy(hf))
    with torch.no_grad():
        model(**batch)
        for mod in attention_modules(model):  # what init functions do: in place, under no_grad
            for name in mod._altclip_fast_qkv_sources:
                torch.nn.init.normal_(getattr(mod, name).weight, std=0.05)
        assert_close(model(**batch), unpatched_copy(model)(**batch))

        before = {name: p.clone() for name, p in model.named_parameters()}
        for mod in model.modules():  # transformers' own re-initialisation, forced for every module
            mod.__dict__.pop("_is_hf_initialized", None)
        model.init_weights()
        assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters() if "query" in name)
        assert_close(model(**batch), unpatched_copy(model)(**batch))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    (model(**batch).logits_per_image ** 2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert_close(model(**batch), unpatched_copy(model)(**batch))


@torch.no_grad()
def test_fused_qkv_is_reused_until_a_source_changes(hf, batch):
    model = altclip_fast.optimize(copy.deepcopy(hf))
    model(**batch)
    module = attention_modules(model)[0]
    fused = module.__dict__["_altclip_fast_qkv"].weight
    model(**batch)
    assert module.__dict__["_altclip_fast_qkv"].weight is fused  # unchanged weights: no copy per call
    module.query.weight.add_(1.0)
    model(**batch)
    rebuilt = module.__dict__["_altclip_fast_qkv"].weight
    assert rebuilt is not fused and torch.equal(rebuilt[: module.query.weight.shape[0]], module.query.weight)
    assert not any("_altclip_fast" in name for name, _ in model.named_buffers())
    assert set(model.state_dict()) == set(hf.state_dict())
    twin = copy.deepcopy(model)  # a copy starts with nothing cached: it holds other tensors
    assert attention_modules(twin)[0].__dict__["_altclip_fast_qkv"].weight is None
    assert_close(twin(**batch), unpatched_copy(model)(**batch))


# --------------------------------------------------------------------------- training behaviour


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "+".join(k for k, v in s.items() if v))
def test_backward_through_patched_modules_matches_transformers(hf, batch, op_calls, switches):
    plain, fast = copy.deepcopy(hf), altclip_fast.optimize(copy.deepcopy(hf), **switches)
    losses = []
    for model in (plain, fast):
        out = model(**batch, output_hidden_states=True)
        loss = (out.logits_per_image ** 2).sum() + out.text_model_output.last_hidden_state.pow(2).mean()
        loss = loss + sum(h.pow(2).mean() for h in out.vision_model_output.hidden_states)
        loss.backward()
        losses.append(loss.detach())
    assert sum(op_calls.values()) == 0  # autograd recorded: transformers' own code ran everywhere
    assert torch.equal(losses[0], losses[1])
    want, got = grads_of(plain), grads_of(fast)
    assert set(got) == set(want) and any("query" in name for name in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_gradients_to_inputs_of_a_frozen_model(hf, batch, op_calls):
    plain = copy.deepcopy(hf).requires_grad_(False)
    fast = altclip_fast.optimize(copy.deepcopy(hf).requires_grad_(False))
    grads = []
    for model in (plain, fast):
        pixels = batch["pixel_values"].clone().requires_grad_()
        model(**dict(batch, pixel_values=pixels)).image_embeds.sum().backward()
        grads.append(pixels.grad)
    assert torch.equal(grads[0], grads[1])
    # the text tower's inputs need no grad there, so it ran the fast path
    assert op_calls["linear_add_layer_norm"] == 2 * CONFIG.text_config.num_hidden_layers


def set_dropout(model, rate):
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = rate
        for name in ("dropout", "attention_dropout"):
            if isinstance(mod.__dict__.get(name), float):
                setattr(mod, name, rate)
    return model


@torch.no_grad()
def test_train_mode_with_dropout_runs_transformers_forward(hf, batch, op_calls, monkeypatch):
    from transformers.models.altclip import modeling_altclip as m

    ran = collections.Counter()
    for cls in (m.AltRobertaSelfAttention, m.AltRobertaSelfOutput, m.AltRobertaOutput, m.AltCLIPAttention):
        original = cls.forward

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            ran[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    plain = set_dropout(copy.deepcopy(hf), 0.25).train()
    fast = altclip_fast.optimize(set_dropout(copy.deepcopy(hf), 0.25).train())
    torch.manual_seed(7)
    want = plain(**batch, output_hidden_states=True)
    ran.clear()
    torch.manual_seed(7)
    got = fast(**batch, output_hidden_states=True)
    layers = CONFIG.text_config.num_hidden_layers
    assert ran == {"AltRobertaSelfAttention": layers, "AltRobertaSelfOutput": layers, "AltRobertaOutput": layers,
                   "AltCLIPAttention": layers}
    assert op_calls["attention"] == op_calls["linear_add_layer_norm"] == 0
    assert_close(got, want)  # the same dropout masks: the fallback draws exactly what transformers draws

    # training mode without dropout changes nothing, so the fast path runs
    set_dropout(fast, 0.0)
    op_calls.clear()
    assert_close(fast(**batch, output_hidden_states=True), set_dropout(plain, 0.0)(**batch, output_hidden_states=True))
    assert op_calls["attention"] == 2 * layers
