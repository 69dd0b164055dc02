"""Checkpoints: linearized models save and load as normal Hugging Face folders.

For every family we register `linearized_<model_type>` with the Auto classes: a config
subclass that carries the `linearize` dict in config.json, and a model subclass that
converts itself in `__init__`, so `AutoModelForCausalLM.from_pretrained(dir)` rebuilds the
exact model. Loading refuses checkpoints with missing, unexpected or corrupt weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .config import LinearizeConfig
from .families import FAMILIES

_CLASSES: dict[tuple[str, type], tuple[type, type]] = {}
BASE_CLASS_ATTR = "_linearize_base_class"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or does not match its config."""


class LinearizedModelMixin:
    """Behaviour shared by every `Linearized<Base>ForCausalLM` class."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        from .convert import convert

        convert(self, LinearizeConfig.from_dict(config.linearize), _in_init=True)

    def forward(self, *args, **kwargs):
        from .cache import LinearizeCache
        from .convert import linearize_state

        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if use_cache and not has_cache and not linearize_state(self).teacher_active:
            kwargs["cache"] = LinearizeCache(self)
        return super().forward(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        from .cache import LinearizeCache
        from .convert import linearize_state

        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None or generation_config.use_cache is False or linearize_state(self).teacher_active:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        model_kwargs["cache"] = LinearizeCache(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"could not load the weights in {pretrained_model_name_or_path}: {e}. "
                                  "The checkpoint may be truncated or corrupt: re-save or re-convert it.") from e
        problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        if "missing_keys" in problems:
            problems["missing_keys"] = [k for k in problems["missing_keys"] if k not in tied]
            if not problems["missing_keys"]:
                del problems["missing_keys"]
        if problems:
            detail = "; ".join(f"{k}: {', '.join(map(str, v[:6]))}{' ...' if len(v) > 6 else ''}" for k, v in problems.items())
            raise CheckpointError(f"checkpoint {pretrained_model_name_or_path} does not match its linearize config ({detail}). "
                                  "Weights would be left random: re-save the model with save_pretrained or convert again.")
        return (model, info) if want_info else model


def linearized_classes(model_type: str, model_cls: type, config_cls: type) -> tuple[type, type]:
    """The (model class, config class) pair a converted model of `model_cls` becomes."""
    base_model = getattr(model_cls, BASE_CLASS_ATTR, model_cls)
    base_config = getattr(config_cls, BASE_CLASS_ATTR, config_cls)
    key = (model_type, base_model)
    if key not in _CLASSES:
        new_type = f"linearized_{model_type}"
        cfg = type(f"Linearized{base_config.__name__}", (base_config,),
                   {"model_type": new_type, BASE_CLASS_ATTR: base_config, "__module__": __name__})
        mdl = type(f"Linearized{base_model.__name__}", (LinearizedModelMixin, base_model),
                   {"config_class": cfg, BASE_CLASS_ATTR: base_model, "__module__": __name__})
        _CLASSES[key] = (mdl, cfg)
    return _CLASSES[key]


def register_auto_classes() -> None:
    """Register `linearized_<family>` with AutoConfig and AutoModelForCausalLM."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for model_type in FAMILIES:
        base_config = CONFIG_MAPPING[model_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        mdl, cfg = linearized_classes(model_type, base_model, base_config)
        if cfg.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cfg.model_type, cfg)
            AutoModelForCausalLM.register(cfg, mdl)


def read_config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a saved model folder "
                              "(save one with model.save_pretrained(dir) or `linearize convert --out dir`)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is corrupt ({e}); re-save the model") from e


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         adapter: str | Path | None = None, **kwargs) -> PreTrainedModel:
    """Load a linearized checkpoint folder (or a plain HF model folder) as a causal LM.

    Args:
        path: a folder written by `save_pretrained` / `linearize convert --out`.
        dtype: e.g. torch.bfloat16 (default: as saved).
        device: move the model there after loading.
        adapter: a peft LoRA adapter folder to apply on top (kept unmerged).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a folder written by save_pretrained or `linearize convert --out`")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json")
    read_config_json(path)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
        from peft import PeftModel

        from .peft_quiet import peft_quietly

        with peft_quietly():
            model = PeftModel.from_pretrained(model, adapter)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model
