"""transformers' model API on the fast models, for code that only changes its import.

Every keyword transformers' ``from_pretrained`` and AltCLIP methods accept is either honoured here or
refused by name with the reason (an ``AltCLIPCompatError``, a ``TypeError``); unknown keywords are
refused the same way rather than silently ignored. ``InferenceAPI`` adds the attributes and methods
user code touches (``num_parameters``, ``get_input_embeddings``, ``main_input_name`` ...), and refuses
the training-only ones: the fast model runs under ``torch.no_grad`` and has no dropout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..devices import auto_device
from ..dtypes import resolve_dtype
from ..model_files import find_weights, read_json, resolve_model_dir
from .checkpoint import Checkpoint, float_dtype, load_checkpoint

__all__ = ["AltCLIPCompatError", "InferenceAPI", "check_call_kwargs", "check_save_kwargs", "device_arg", "read_pretrained", "with_loading_info"]


class AltCLIPCompatError(TypeError):
    """A transformers argument or method that altclip_fast does not support, named with the reason."""


# from_pretrained keywords that are accepted and change nothing here, with the reason.
NO_EFFECT = {
    "low_cpu_mem_usage": "the model is always built on the meta device and the weights loaded straight into place",
    "trust_remote_code": "AltCLIP is built in; there is no remote code to run",
    "disable_mmap": "the weights are copied into the model's own tensors; nothing stays mapped",
    "tqdm_class": "no progress bar is shown",
    "_from_auto": "transformers bookkeeping",
    "_from_pipeline": "transformers bookkeeping",
    "_commit_hash": "transformers bookkeeping",
}

# transformers' attention implementations: all give the same outputs, which the fast model's own
# attention also gives, so the choice is accepted and has no effect.
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

_ONE_DEVICE = "altclip_fast keeps the whole model on one device"
# from_pretrained keywords refused unless given their default (the accepted values), with the reason.
REFUSED = {
    "quantization_config": ((None,), "quantized weights are not supported: the model runs in float32, float16 or bfloat16"),
    "gguf_file": ((None,), "GGUF files are not supported: pass a directory with safetensors or pytorch_model.bin"),
    "variant": ((None,), "weight variants (model.<variant>.safetensors) are not supported"),
    "state_dict": ((None,), "build from a state dict with AltCLIPModel.from_state_dict(config, state_dict)"),
    "key_mapping": ((None,), "altclip_fast maps checkpoint keys itself (transformers 4 and 5 layouts)"),
    "ignore_mismatched_sizes": ((False,), "nothing is left at random initialisation: a shape mismatch is an error"),
    "weights_only": ((True,), "pytorch_model.bin is only read with weights_only=True: unpickling can run code"),
    "proxies": ((None,), "huggingface_hub takes no proxies argument; set HTTPS_PROXY instead"),
    "tp_plan": ((None,), f"tensor parallelism is not supported: {_ONE_DEVICE}"),
    "tp_size": ((None,), f"tensor parallelism is not supported: {_ONE_DEVICE}"),
    "device_mesh": ((None,), f"tensor parallelism is not supported: {_ONE_DEVICE}"),
    "distributed_config": ((None,), f"distributed loading is not supported: {_ONE_DEVICE}"),
    "max_memory": ((None,), f"memory-capped placement is not supported: {_ONE_DEVICE}"),
    "offload_folder": ((None,), f"offloading is not supported: {_ONE_DEVICE}"),
    "offload_buffers": ((None, False), f"offloading is not supported: {_ONE_DEVICE}"),
    "offload_state_dict": ((None, False), f"offloading is not supported: {_ONE_DEVICE}"),
    "adapter_kwargs": ((None,), "PEFT adapters are not supported"),
    "adapter_name": ((None,), "PEFT adapters are not supported"),
    "use_kernels": ((None, False), "Hub kernels do not apply: altclip_fast runs its own kernels"),
    "kernel_config": ((None,), "Hub kernels do not apply: altclip_fast runs its own kernels"),
    "allow_all_kernels": ((None, False), "Hub kernels do not apply: altclip_fast runs its own kernels"),
    "fusion_config": ((None,), "altclip_fast always runs its own fused layers"),
    "experts_implementation": ((None,), "AltCLIP has no mixture of experts"),
    "generation_config": ((None,), "AltCLIP does not generate text"),
}

# huggingface_hub.snapshot_download options, honoured for hub ids (a local directory ignores them).
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download")

# Keywords of forward / get_*_features that transformers accepts through ``**kwargs``
# (TransformersKwargs), refused unless given their default.
CALL_REFUSED = {
    "num_items_in_batch": ((None,), "it scales a training loss; altclip_fast is for inference"),
    "output_router_logits": ((None, False), "AltCLIP has no router"),
    "cu_seq_lens_q": ((None,), "the text tower packs real tokens itself: pass attention_mask"),
    "cu_seq_lens_k": ((None,), "the text tower packs real tokens itself: pass attention_mask"),
    "max_length_q": ((None,), "the text tower packs real tokens itself: pass attention_mask"),
    "max_length_k": ((None,), "the text tower packs real tokens itself: pass attention_mask"),
    "seq_idx": ((None,), "the text tower packs real tokens itself: pass attention_mask"),
    "is_causal": ((None, False), "AltCLIP's encoders attend both ways"),
    "use_cache": ((None, False), "AltCLIP's encoders keep no cache"),
    "labels": ((None,), "AltCLIP has no labels; return_loss=True gives the contrastive loss"),
}


# save_pretrained keywords: accepted with no effect, with the reason ...
SAVE_NO_EFFECT = {
    "max_shard_size": "the weights are written as one model.safetensors, which both loaders read at any size",
    "token": "only used to push to the Hub, which save_pretrained does not do here",
    "save_peft_format": "there are no adapters to save",
}
# ... and refused unless given their default.
SAVE_REFUSED = {
    "safe_serialization": ((True,), "only safetensors is written: a pickled pytorch_model.bin can run code when loaded"),
    "push_to_hub": ((False,), "upload the folder with huggingface_hub.upload_folder after saving"),
    "is_main_process": ((True,), "save from one process; altclip_fast does not coordinate several"),
    "state_dict": ((None,), "the model's own parameters are saved; save another state dict with safetensors"),
    "save_function": ((None,), "the file is written with safetensors"),
    "variant": ((None,), "weight variants (model.<variant>.safetensors) are not supported"),
}


def check_save_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse, by name and with the reason, every ``save_pretrained`` keyword that changes what
    transformers would write in a way this writer does not; the rest pass."""
    for name, value in kwargs.items():
        if name in SAVE_NO_EFFECT or _refuse_unless_default("save_pretrained", name, value, SAVE_REFUSED):
            continue
        raise AltCLIPCompatError(f"save_pretrained() got an unexpected keyword argument {name!r}: neither "
                                 "altclip_fast nor transformers takes it")


def _refuse_unless_default(where: str, name: str, value: Any, table: dict) -> bool:
    """True when ``name`` is in ``table`` and ``value`` is one it accepts; raises when refused."""
    if name not in table:
        return False
    accepted, reason = table[name]
    if any(value is a or (type(value) is type(a) and value == a) for a in accepted):
        return True
    raise AltCLIPCompatError(f"{where}: {name}={value!r} is not supported: {reason}")


def check_call_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    """Refuse, by name and with the reason, every keyword of a forward method that the fast model
    cannot honour; transformers' defaults pass."""
    for name, value in kwargs.items():
        if not _refuse_unless_default(where, name, value, CALL_REFUSED):
            raise AltCLIPCompatError(f"{where}() got an unexpected keyword argument {name!r}: neither "
                                     "altclip_fast nor transformers' AltCLIP takes it")


def _device_from_map(device_map) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {_device_from_map(v) for v in device_map.values()}
        if len(devices) != 1:
            raise AltCLIPCompatError(
                f"from_pretrained: device_map={device_map!r} spreads the model over {len(devices)} devices: "
                f"{_ONE_DEVICE}; pass one device"
            )
        return devices.pop()
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return auto_device()
    if device_map == "disk":
        raise AltCLIPCompatError(f"from_pretrained: device_map='disk' is not supported: {_ONE_DEVICE}")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def device_arg(device, device_map):
    """``device``, or the one device ``device_map`` names (transformers' keyword: a device, an index,
    ``"auto"``, or a dict that puts every module on the same device)."""
    mapped = _device_from_map(device_map)
    if mapped is None:
        return device
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree")
    return mapped


def dtype_arg(dtype, torch_dtype):
    """``dtype``, or transformers 4's name for it."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree")
    return dtype if dtype is not None else torch_dtype


def _auto_dtype(model_dir: Path | None, state_dict) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's ``dtype`` (or ``torch_dtype``), else the dtype of
    the checkpoint's floating-point weights."""
    if model_dir is not None:
        raw = read_json(model_dir / "config.json", missing={})
        for key in ("dtype", "torch_dtype"):
            if isinstance(raw.get(key), str):
                return resolve_dtype(raw[key])
    return resolve_dtype(float_dtype(state_dict) or torch.float32)


def _config_override(config, loaded, section: str | None):
    """``config=`` as transformers takes it (a config object, a dict, or a path to a directory or a
    JSON file), as the config class ``loaded`` is; a full AltCLIP config given to a tower gives its
    ``section``."""
    cls = type(loaded)
    if isinstance(config, cls):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        config = read_json(path / "config.json" if path.is_dir() else path)
    elif hasattr(config, "to_dict") and not isinstance(config, dict):
        if section is not None and hasattr(config, section):
            config = getattr(config, section)
        config = config.to_dict()
    if not isinstance(config, dict):
        raise AltCLIPCompatError(f"from_pretrained: config must be a config object, a dict or a path, got {type(config).__name__}")
    if section is not None and isinstance(config.get(section), dict):
        config = config[section]
    return cls.from_dict(config)


class PretrainedArgs(NamedTuple):
    checkpoint: Checkpoint
    dtype: torch.dtype | str | None
    device: Any
    loading_info: bool


def read_pretrained(path_or_id, part: str, *, dtype, torch_dtype, device, device_map, kwargs) -> PretrainedArgs:
    """Read a checkpoint for ``from_pretrained``, honouring or refusing each of transformers' keywords."""
    where = "from_pretrained"
    dtype = dtype_arg(dtype, torch_dtype)
    device = device_arg(device, device_map)
    hub, config, loading_info, use_safetensors, subfolder = {}, None, False, None, ""
    for name, value in kwargs.items():
        if name in HUB_OPTIONS:
            if value is not None:
                hub[name] = value
        elif name == "subfolder":
            subfolder = value or ""
        elif name == "config":
            config = value
        elif name == "use_safetensors":
            use_safetensors = value
        elif name == "attn_implementation":
            if value not in ATTN_IMPLEMENTATIONS:
                raise AltCLIPCompatError(
                    f"{where}: attn_implementation={value!r} is not one of transformers' "
                    f"{[a for a in ATTN_IMPLEMENTATIONS if a]}"
                )
        elif name in NO_EFFECT:
            pass
        elif name == "output_loading_info":
            loading_info = bool(value)
        elif not _refuse_unless_default(where, name, value, REFUSED):
            raise AltCLIPCompatError(
                f"{where}: unknown keyword {name}={value!r}. altclip_fast takes no config overrides as "
                "keywords (transformers passes unknown ones to the config): edit config.json or pass config="
            )
    model_dir = resolve_model_dir(path_or_id, subfolder=subfolder, **hub)
    weights = find_weights(model_dir)
    if use_safetensors is not None and weights is not None and use_safetensors != weights.name.startswith("model.safetensors"):
        raise AltCLIPCompatError(
            f"{where}: use_safetensors={use_safetensors} but {model_dir} holds {weights.name}, which is what "
            "altclip_fast reads (safetensors first, then pytorch_model.bin)"
        )
    ckpt = load_checkpoint(model_dir, part)
    if config is not None:
        section = {"text": "text_config", "vision": "vision_config"}.get(part)
        ckpt = ckpt._replace(config=_config_override(config, ckpt.config, section))
    if isinstance(dtype, str) and dtype == "auto":
        dtype = _auto_dtype(model_dir, ckpt.state_dict)
    return PretrainedArgs(ckpt, dtype, device, loading_info)


def with_loading_info(model, loading_info: bool):
    """transformers' ``output_loading_info=True``: ``(model, info)``. Every list is empty: a missing,
    unexpected or mismatched key is an error here, never a warning."""
    if not loading_info:
        return model
    return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def _training_only(what: str, why: str = "") -> AltCLIPCompatError:
    return AltCLIPCompatError(
        f"{what} is training-only API: altclip_fast runs inference only (forward runs under torch.no_grad, "
        f"without dropout){why}. Use transformers' AltCLIPModel to train, optionally with altclip_fast.optimize "
        "for its inference"
    )


class InferenceAPI:
    """transformers' ``PreTrainedModel`` attributes and methods that make sense for inference, and clear
    refusals of the training-only ones. Mixed into the fast ``nn.Module`` models."""

    main_input_name = "input_ids"
    base_model_prefix = "altclip"
    supports_gradient_checkpointing = False
    is_gradient_checkpointing = False

    @classmethod
    def can_generate(cls) -> bool:
        """AltCLIP embeds text and images; it does not generate."""
        return False

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, counted as transformers counts them: ``exclude_embeddings`` leaves out
        the embedding tables (word, position and token type), not the patch embedding."""
        skip = {id(p) for p in self._embedding_tables()} if exclude_embeddings else set()
        return sum(
            p.numel() for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def _embedding_tables(self) -> list[torch.Tensor]:
        """The parameters transformers holds in ``nn.Embedding`` modules."""
        tables = [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]
        return tables + [m.position_embedding for m in self.modules() if isinstance(getattr(m, "position_embedding", None), nn.Parameter)]

    def get_output_embeddings(self):
        """None, as in transformers: AltCLIP has no language-model head."""
        return None

    def set_input_embeddings(self, value):
        raise AltCLIPCompatError(
            "set_input_embeddings is not supported: the fast model's embeddings are checkpoint weights; "
            "load a checkpoint that holds the ones you want"
        )

    def resize_token_embeddings(self, *args, **kwargs):
        raise _training_only("resize_token_embeddings", "; a resized table needs training")

    def gradient_checkpointing_enable(self, *args, **kwargs):
        raise _training_only("gradient_checkpointing_enable", "; no activations are kept for backward")

    def gradient_checkpointing_disable(self) -> None:
        """Nothing to disable: gradient checkpointing is never on."""

    def enable_input_require_grads(self):
        raise _training_only("enable_input_require_grads")

    def init_weights(self):
        raise _training_only("init_weights", "; weights come from a checkpoint (from_pretrained / from_state_dict)")

    def train(self, mode: bool = True):
        if mode:
            raise _training_only("train()", "; eval() is the only mode")
        return super().train(False)
