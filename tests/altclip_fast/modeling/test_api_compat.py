"""The README's compatibility table, row by row: each entry of transformers' AltCLIP API is called on
the fast model and does what its row says (supported, differs as described, or refused by name)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from altclip_fast import AltCLIPModel, AltCLIPTextModel, AltCLIPVisionModel
from altclip_fast.modeling.compat import AltCLIPCompatError
from tests.checkpoints import make_pixels, make_text_batch, random_hf_model, save_hf, tiny_config
from tests.parity import rel_err

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[3] / "README.md"
CONFIG = tiny_config()
TOL = 1e-5


def table_rows() -> list[tuple[str, str]]:
    """(entry, status) of each row of the README's compatibility table."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Compatibility with transformers' AltCLIP API"):]
    section = section[: section.index("\n\n", section.index("| --- |"))]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows.append((cells[0], cells[1]))
    return rows


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(CONFIG, seed=5)


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    return save_hf(hf, tmp_path_factory.mktemp("compat_ckpt"))


@pytest.fixture(scope="module")
def fast(saved):
    return AltCLIPModel.from_pretrained(saved)


@pytest.fixture(scope="module")
def inputs():
    ids, mask = make_text_batch(CONFIG, [5, 9, 3], seed=1)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=make_pixels(CONFIG, 2, seed=2))


class Ctx:
    """What a row's check is given, and what it saw: calls that worked (``works``, ``same_outputs``),
    a difference from transformers that the check asserted (``differs``), and refusals (``refused``).
    ``test_row`` holds these against the row's status column."""

    def __init__(self, hf, saved, fast, inputs, tmp_path, monkeypatch):
        self.hf, self.saved, self.fast, self.inputs = hf, saved, fast, inputs
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.worked = self.differences = self.refusals = 0

    def same_outputs(self, model, tol=TOL):
        with torch.no_grad():
            want = self.hf(**self.inputs)
        got = model(**self.inputs)
        assert rel_err(got.logits_per_image, want.logits_per_image) < tol
        assert rel_err(got.text_embeds, want.text_embeds) < tol
        self.works()

    def same_outputs_with_defaults(self, model):
        """A refused option given its default value changes nothing (not the use the row refuses)."""
        self.same_outputs(model)
        self.worked -= 1

    def works(self):
        """The calls above returned what the row says."""
        self.worked += 1

    def differs(self):
        """The assertions above checked the difference from transformers that the row describes."""
        self.differences += 1

    def refused(self, fn, name: str, error: type[Exception] = AltCLIPCompatError):
        with pytest.raises(error, match=re.escape(name)):
            fn()
        self.refusals += 1

    def status(self) -> str:
        """The status column this check's observations support."""
        if self.worked == 0:
            return "refused" if self.refusals and not self.differences else "nothing checked"
        return "differs" if self.differences else "supported"  # refusing invalid values is allowed


# --------------------------------------------------------------------------- one check per row


def _from_pretrained(c):
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved))
    c.same_outputs(AltCLIPModel.from_pretrained(str(c.saved)))


def _dtype(c):
    assert AltCLIPModel.from_pretrained(c.saved, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AltCLIPModel.from_pretrained(c.saved, torch_dtype="float16").dtype == torch.float16
    assert AltCLIPModel.from_pretrained(c.saved, dtype="auto").dtype == torch.float32  # saved in fp32
    assert AltCLIPTextModel.from_pretrained(c.saved, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AltCLIPVisionModel.from_pretrained(c.saved, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="disagree"):
        AltCLIPModel.from_pretrained(c.saved, dtype=torch.float16, torch_dtype=torch.bfloat16)
    c.works()


def _device_map(c):
    assert AltCLIPModel.from_pretrained(c.saved, device_map="cpu").device.type == "cpu"
    assert AltCLIPModel.from_pretrained(c.saved, device_map={"": "cpu"}).device.type == "cpu"
    auto = AltCLIPModel.from_pretrained(c.saved, device_map="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, device_map={"text_model": "cpu", "vision_model": "cuda:0"}),
            "device_map")
    c.differs()
    c.works()


def _hub_options(c):
    model = AltCLIPModel.from_pretrained(
        c.saved, revision="main", cache_dir=str(c.tmp_path), local_files_only=True, token=None, force_download=False
    )
    c.same_outputs(model)
    nested = save_hf(c.hf, c.tmp_path / "repo" / "sub").parent
    c.same_outputs(AltCLIPModel.from_pretrained(nested, subfolder="sub"))
    # a hub id: the options reach huggingface_hub
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(nested)

    c.monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    c.same_outputs(AltCLIPModel.from_pretrained(
        "someone/altclip", revision="v2", cache_dir="/cache", local_files_only=True, token="t", subfolder="sub"
    ))
    assert calls[0]["revision"] == "v2" and calls[0]["local_files_only"] is True
    assert calls[0]["cache_dir"] == "/cache" and calls[0]["token"] == "t"
    assert all(p.startswith("sub/") for p in calls[0]["allow_patterns"])


def _config(c):
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved, config=c.hf.config))
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved, config=c.fast.config))
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved, config=c.saved / "config.json"))
    text = AltCLIPTextModel.from_pretrained(c.saved, config=c.hf.config)  # a full config gives its section
    assert text.config.hidden_size == CONFIG.text_config.hidden_size


def _loading_info(c):
    model, info = AltCLIPModel.from_pretrained(c.saved, output_loading_info=True)
    c.same_outputs(model)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def _use_safetensors(c):
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved, use_safetensors=True))
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, use_safetensors=False), "use_safetensors")


def _attn_implementation(c):
    for name in ("eager", "sdpa", "flash_attention_2"):
        c.same_outputs(AltCLIPModel.from_pretrained(c.saved, attn_implementation=name))
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, attn_implementation="magic"), "attn_implementation")
    c.differs()


def _no_effect(c):
    c.same_outputs(AltCLIPModel.from_pretrained(c.saved, low_cpu_mem_usage=True, trust_remote_code=True))
    c.differs()


def _refused_loading(c):
    for name, value in dict(
        quantization_config={"load_in_8bit": True}, gguf_file="model.gguf", variant="fp16", tp_plan="auto",
        max_memory={0: "1GB"}, offload_folder="offload", adapter_kwargs={}, use_kernels=True, key_mapping={},
        state_dict={},
    ).items():
        c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, **{name: value}), name)
        c.refused(lambda: AltCLIPVisionModel.from_pretrained(c.saved, **{name: value}), name)
    # their defaults, given explicitly, are fine
    c.same_outputs_with_defaults(AltCLIPModel.from_pretrained(c.saved, quantization_config=None, use_kernels=False, variant=None))


def _ignore_mismatched(c):
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, ignore_mismatched_sizes=True), "ignore_mismatched_sizes")
    c.same_outputs_with_defaults(AltCLIPModel.from_pretrained(c.saved, ignore_mismatched_sizes=False))


def _weights_only(c):
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, weights_only=False), "weights_only")
    c.same_outputs_with_defaults(AltCLIPModel.from_pretrained(c.saved, weights_only=True))


def _config_overrides(c):
    c.refused(lambda: AltCLIPModel.from_pretrained(c.saved, hidden_size=8), "hidden_size")
    c.refused(lambda: AltCLIPTextModel.from_pretrained(c.saved, output_hidden_states=True), "output_hidden_states")


def _save_pretrained(c):
    c.fast.save_pretrained(c.tmp_path / "saved")
    theirs = transformers.AltCLIPModel.from_pretrained(c.tmp_path / "saved").eval()
    with torch.no_grad():
        assert rel_err(theirs(**c.inputs).logits_per_image, c.fast(**c.inputs).logits_per_image) < TOL
    c.works()


def _save_no_effect(c):
    c.fast.save_pretrained(c.tmp_path / "one", max_shard_size="1KB", token="unused", save_peft_format=True)
    assert sorted(p.name for p in (c.tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    c.same_outputs(AltCLIPModel.from_pretrained(c.tmp_path / "one"))
    c.differs()


def _save_refused(c):
    for name, value in (("safe_serialization", False), ("push_to_hub", True), ("is_main_process", False),
                        ("state_dict", {}), ("save_function", print), ("variant", "fp16")):
        c.refused(lambda: c.fast.save_pretrained(c.tmp_path / name, **{name: value}), name)
        assert not (c.tmp_path / name).exists(), f"{name}: refused, but something was written"
    c.refused(lambda: c.fast.save_pretrained(c.tmp_path / "x", shard_everything=True), "shard_everything")
    c.fast.save_pretrained(c.tmp_path / "defaults", safe_serialization=True, push_to_hub=False, is_main_process=True)
    c.same_outputs_with_defaults(AltCLIPModel.from_pretrained(c.tmp_path / "defaults"))


def _forward(c):
    c.same_outputs(c.fast)


def _hidden_states(c):
    with torch.no_grad():
        want = c.hf(**c.inputs, output_hidden_states=True)
    got = c.fast(**c.inputs, output_hidden_states=True)
    mask = c.inputs["attention_mask"].bool()
    for tower in ("text_model_output", "vision_model_output"):
        assert len(got[tower].hidden_states) == len(want[tower].hidden_states) == CONFIG.text_config.num_hidden_layers + 1
    for a, b in zip(got.text_model_output.hidden_states, want.text_model_output.hidden_states):
        assert rel_err(a[mask], b[mask]) < TOL
        assert not a[~mask].any()  # the difference the row states: pad positions are zeros
    for a, b in zip(got.vision_model_output.hidden_states, want.vision_model_output.hidden_states):
        assert rel_err(a, b) < TOL
    c.differs()
    c.works()


def _attentions(c):
    eager = copy.deepcopy(c.hf)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        want = eager(**c.inputs, output_attentions=True)
    got = c.fast(**c.inputs, output_attentions=True)
    for tower in ("text_model_output", "vision_model_output"):
        for a, b in zip(got[tower].attentions, want[tower].attentions):
            assert a.shape == b.shape and rel_err(a, b) < TOL
    c.differs()
    c.works()


def _return_dict_false(c):
    out = c.fast(**c.inputs, return_dict=False)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], c.fast(**c.inputs).logits_per_image)
    c.works()


def _return_loss(c):
    with torch.no_grad():
        want = c.hf(**dict(c.inputs, pixel_values=make_pixels(CONFIG, 3, seed=4)), return_loss=True).loss
    got = c.fast(**dict(c.inputs, pixel_values=make_pixels(CONFIG, 3, seed=4)), return_loss=True).loss
    assert rel_err(got, want) < TOL
    c.works()


def _interpolate(c):
    size = CONFIG.vision_config.image_size + CONFIG.vision_config.patch_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    batch = dict(c.inputs, pixel_values=pixels)
    with torch.no_grad():
        want = c.hf(**batch, interpolate_pos_encoding=True)
    assert rel_err(c.fast(**batch, interpolate_pos_encoding=True).image_embeds, want.image_embeds) < TOL
    c.works()


def _inputs_embeds(c):
    ids, mask = c.inputs["input_ids"], c.inputs["attention_mask"]
    embeds = c.fast.text_model.word_embeddings(ids)
    with torch.no_grad():
        want = c.hf.text_model(inputs_embeds=embeds, attention_mask=mask)
    got = c.fast.text_model(inputs_embeds=embeds, attention_mask=mask)
    assert rel_err(got.pooler_output, want.pooler_output) < TOL
    c.works()


def _call_refused(c):
    for name, value in dict(num_items_in_batch=torch.tensor(3), cu_seq_lens_q=torch.tensor([0, 3]), is_causal=True).items():
        c.refused(lambda: c.fast(**c.inputs, **{name: value}), name)
        c.refused(lambda: c.fast.get_text_features(c.inputs["input_ids"], **{name: value}), name)
        c.refused(lambda: c.fast.vision_model(c.inputs["pixel_values"], **{name: value}), name)
    c.refused(lambda: c.fast(**c.inputs, frobnicate=1), "frobnicate")
    c.same_outputs_with_defaults(lambda **kw: c.fast(**kw, num_items_in_batch=None, is_causal=False))


def _text_features(c):
    ids, mask = c.inputs["input_ids"], c.inputs["attention_mask"]
    got = c.fast.get_text_features(ids, mask)
    with torch.no_grad():
        want = c.hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert isinstance(got, torch.Tensor) and got.shape == (3, CONFIG.projection_dim)
    assert rel_err(got, want) < TOL
    c.differs()
    c.works()


def _image_features(c):
    got = c.fast.get_image_features(c.inputs["pixel_values"])
    with torch.no_grad():
        want = c.hf.get_image_features(pixel_values=c.inputs["pixel_values"]).pooler_output
    assert isinstance(got, torch.Tensor) and rel_err(got, want) < TOL
    c.differs()
    c.works()


def _text_features_more(c):
    ids, mask = c.inputs["input_ids"], c.inputs["attention_mask"]
    with torch.no_grad():
        want = c.hf.get_text_features(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    got = c.fast.get_text_features(ids, mask, output_hidden_states=True)
    assert rel_err(got.pooler_output, want.pooler_output) < TOL
    assert len(got.hidden_states) == len(want.hidden_states)
    assert rel_err(c.fast.get_text_features(ids, mask, return_dict=True).pooler_output, want.pooler_output) < TOL
    c.works()


def _image_features_more(c):
    pixels = c.inputs["pixel_values"]
    with torch.no_grad():
        want = c.hf.get_image_features(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    got = c.fast.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
    assert rel_err(got.pooler_output, want.pooler_output) < TOL
    assert rel_err(got.hidden_states[-1], want.hidden_states[-1]) < TOL
    assert isinstance(c.fast.get_image_features(pixels, output_hidden_states=True, return_dict=False), tuple)
    assert isinstance(c.fast.get_image_features(pixels, return_dict=False), torch.Tensor)
    c.works()


def _num_parameters(c):
    pairs = [(c.fast, c.hf), (c.fast.text_model, c.hf.text_model), (c.fast.vision_model, c.hf.vision_model)]
    for ours, theirs in pairs:
        for kw in (dict(), dict(exclude_embeddings=True), dict(only_trainable=True)):
            assert ours.num_parameters(**kw) == theirs.num_parameters(**kw), (type(ours).__name__, kw)
    c.works()


def _input_embeddings(c):
    text = c.fast.text_model.get_input_embeddings()
    assert isinstance(text, torch.nn.Embedding) and torch.equal(text.weight, c.hf.text_model.get_input_embeddings().weight)
    conv = c.fast.vision_model.get_input_embeddings()
    theirs = c.hf.vision_model.get_input_embeddings()
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight is c.fast.vision_model.patch_embedding
    with torch.no_grad():
        assert rel_err(conv(c.inputs["pixel_values"]), theirs(c.inputs["pixel_values"])) < TOL
    assert c.fast.get_input_embeddings() is text
    c.works()


def _output_embeddings(c):
    assert c.fast.get_output_embeddings() is None and c.hf.get_output_embeddings() is None
    c.works()


def _pairs(c):
    return [(c.fast, c.hf), (c.fast.text_model, c.hf.text_model), (c.fast.vision_model, c.hf.vision_model)]


def _main_input_name(c):
    for ours, theirs in _pairs(c):
        assert ours.main_input_name == theirs.main_input_name
    c.works()


def _base_model_prefix(c):
    for ours, theirs in _pairs(c):
        assert ours.base_model_prefix == theirs.base_model_prefix
    c.works()


def _can_generate(c):
    for ours, theirs in _pairs(c):
        assert ours.can_generate() is theirs.can_generate() is False
    c.works()


def _attributes(c):
    assert c.fast.config.projection_dim == CONFIG.projection_dim
    assert c.fast.dtype == torch.float32 and c.fast.device.type == "cpu"
    c.works()


def _conversions(c):
    model = copy.deepcopy(c.fast)
    assert model.to(torch.float32).eval() is model and not model.training
    c.same_outputs(model)
    half = copy.deepcopy(c.fast).half()
    assert half.dtype == torch.float16
    assert rel_err(half(**c.inputs).text_embeds.float(), model(**c.inputs).text_embeds) < 1e-2
    if torch.cuda.is_available():
        assert model.cuda().device.type == "cuda"


def _train(c):
    model = copy.deepcopy(c.fast)
    c.refused(lambda: model.train(), "train()")
    c.refused(lambda: model.text_model.train(True), "train()")
    assert model.train(False) is model


def _backward(c):
    out = c.fast(**dict(c.inputs, pixel_values=make_pixels(CONFIG, 3, seed=4)), return_loss=True)
    assert not out.loss.requires_grad
    c.refused(lambda: out.loss.backward(), "does not require grad", RuntimeError)


def _gradient_checkpointing(c):
    c.refused(lambda: c.fast.gradient_checkpointing_enable(), "gradient_checkpointing_enable")
    assert c.fast.supports_gradient_checkpointing is False


def _init_weights(c):
    c.refused(lambda: c.fast.init_weights(), "init_weights")


def _embedding_setters(c):
    c.refused(lambda: c.fast.resize_token_embeddings(10), "resize_token_embeddings")
    c.refused(lambda: c.fast.text_model.set_input_embeddings(torch.nn.Embedding(3, 4)), "set_input_embeddings")


def _input_require_grads(c):
    c.refused(lambda: c.fast.enable_input_require_grads(), "enable_input_require_grads")


CHECKS = {
    "`from_pretrained(path_or_id)`": _from_pretrained,
    "`from_pretrained(dtype=, torch_dtype=)`": _dtype,
    "`from_pretrained(device_map=)`": _device_map,
    "`from_pretrained(revision=, cache_dir=, local_files_only=, token=, force_download=, subfolder=)`": _hub_options,
    "`from_pretrained(config=)`": _config,
    "`from_pretrained(output_loading_info=True)`": _loading_info,
    "`from_pretrained(use_safetensors=)`": _use_safetensors,
    "`from_pretrained(attn_implementation=)`": _attn_implementation,
    "`from_pretrained(low_cpu_mem_usage=, trust_remote_code=)`": _no_effect,
    "`from_pretrained(quantization_config=, gguf_file=, variant=, tp_plan=, max_memory=, offload_folder=, "
    "adapter_kwargs=, use_kernels=, key_mapping=, state_dict=)`": _refused_loading,
    "`from_pretrained(ignore_mismatched_sizes=True)`": _ignore_mismatched,
    "`from_pretrained(weights_only=False)`": _weights_only,
    "`from_pretrained(hidden_size=...)` (config overrides)": _config_overrides,
    "`save_pretrained(dir)`": _save_pretrained,
    "`save_pretrained(max_shard_size=, token=, save_peft_format=)`": _save_no_effect,
    "`save_pretrained(safe_serialization=False, push_to_hub=True, is_main_process=False, state_dict=, "
    "save_function=, variant=)`": _save_refused,
    "`model(**inputs)`": _forward,
    "`model(output_hidden_states=True)`": _hidden_states,
    "`model(output_attentions=True)`": _attentions,
    "`model(return_dict=False)`": _return_dict_false,
    "`model(return_loss=True)`": _return_loss,
    "`model(interpolate_pos_encoding=True)`": _interpolate,
    "`text_model(inputs_embeds=)`": _inputs_embeds,
    "`model(num_items_in_batch=, cu_seq_lens_q=, is_causal=True)`": _call_refused,
    "`get_text_features(input_ids, attention_mask)`": _text_features,
    "`get_image_features(pixel_values)`": _image_features,
    "`get_text_features(output_hidden_states=True)`": _text_features_more,
    "`get_image_features(output_hidden_states=True)`": _image_features_more,
    "`num_parameters(only_trainable=, exclude_embeddings=)`": _num_parameters,
    "`get_input_embeddings()`": _input_embeddings,
    "`get_output_embeddings()`": _output_embeddings,
    "`main_input_name`": _main_input_name,
    "`base_model_prefix`": _base_model_prefix,
    "`can_generate()`": _can_generate,
    "`config`, `dtype`, `device`": _attributes,
    "`to()`, `half()`, `cuda()`, `eval()`": _conversions,
    "`train()`": _train,
    "`loss.backward()`": _backward,
    "`gradient_checkpointing_enable()`": _gradient_checkpointing,
    "`init_weights()`": _init_weights,
    "`resize_token_embeddings()`, `set_input_embeddings()`": _embedding_setters,
    "`enable_input_require_grads()`": _input_require_grads,
}


def test_every_row_has_a_check_and_every_check_a_row():
    rows = [entry for entry, _ in table_rows()]
    assert len(rows) == len(set(rows))
    assert set(rows) == set(CHECKS)
    assert {status for _, status in table_rows()} <= {"supported", "differs", "refused"}


@pytest.mark.parametrize("entry,status", table_rows(), ids=[e.strip("`")[:60] for e, _ in table_rows()])
def test_row(entry, status, hf, saved, fast, inputs, tmp_path, monkeypatch):
    ctx = Ctx(hf, saved, fast, inputs, tmp_path, monkeypatch)
    CHECKS[entry](ctx)
    assert ctx.status() == status, f"the README says {status}; the check saw {ctx.status()}"
