"""The classes a converted model takes, registered with transformers' Auto classes.

For every family, `linearized_<model_type>`: a config subclass that carries the `linearize`
dict in config.json, and a model subclass that linearizes itself in `__init__`, so
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds the exact model, creates the decode
cache for `generate()` and refuses weights that do not fit their config.

A saved folder also describes itself to a process that never imported linearize: its
config.json names `modeling_linearized.py` in `auto_map`, a three-line module written beside
the weights that imports the installed linearize and hands transformers these classes, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and
`lm_eval --model hf --model_args pretrained=dir,trust_remote_code=True` load the student.
"""
from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LinearizeCache
from .config import LinearizeConfig
from .families import FAMILIES
from .load_checks import CheckpointError, checked_from_pretrained
from .state import BASE_CLASS_ATTR, linearize_state
from .surgery import linearize_modules

_CLASSES: dict[tuple[str, type], tuple[type, type]] = {}
AUTO_MODULE = "modeling_linearized"


def auto_map() -> dict[str, str]:
    """The config.json `auto_map` of a linearized model (classes in `AUTO_MODULE`)."""
    return {"AutoConfig": f"{AUTO_MODULE}.LinearizedConfig",
            "AutoModelForCausalLM": f"{AUTO_MODULE}.LinearizedForCausalLM"}


def auto_module_source(model_type: str) -> str:
    """The text of `AUTO_MODULE`.py for a linearized `model_type` folder."""
    return (f'"""Loads this folder\'s linearized {model_type} model through transformers\' Auto classes '
            '(trust_remote_code=True)\nwith the installed linearize package (pip install linearize)."""\n'
            "from linearize.hf_classes import auto_classes\n\n"
            f"LinearizedConfig, LinearizedForCausalLM = auto_classes({model_type!r})\n")


def auto_classes(model_type: str) -> tuple[type, type]:
    """(config class, model class) registered for a linearized `model_type` (the `AUTO_MODULE`'s)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    register_auto_classes()
    base_config = CONFIG_MAPPING[model_type]
    mdl, cfg = linearized_classes(model_type, MODEL_FOR_CAUSAL_LM_MAPPING[base_config], base_config)
    return cfg, mdl


class LinearizedModelMixin:
    """Behaviour shared by every `Linearized<Base>ForCausalLM` class."""

    def __init__(self, config, *args, **kwargs):
        if not isinstance(getattr(config, "linearize", None), dict):
            raise CheckpointError(f"config.json has model_type {config.model_type!r} but no `linearize` field (the "
                                  "conversion settings): it was edited or written by another tool; restore it or "
                                  "convert the model again")
        super().__init__(config, *args, **kwargs)
        linearize_modules(self, LinearizeConfig.from_dict(config.linearize))

    def forward(self, *args, **kwargs):
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if use_cache and not has_cache and not linearize_state(self).teacher_active:
            kwargs["cache"] = LinearizeCache(self)
        return super().forward(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None or generation_config.use_cache is False or linearize_state(self).teacher_active:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        model_kwargs["cache"] = LinearizeCache(self)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', plus `AUTO_MODULE`.py so the folder loads without `import linearize`."""
        self.config.auto_map = auto_map()
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            base_type = self.config.model_type.removeprefix("linearized_")
            (Path(save_directory) / f"{AUTO_MODULE}.py").write_text(auto_module_source(base_type))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = checked_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        return (model, info) if want_info else model


def _forward_with_signature(base_model: type):
    """`LinearizedModelMixin.forward` under the base model's forward signature: `generate` reads
    the signature to decide whether to pass position_ids, and without them a left-padded row's
    positions would start at its padding (LoLCATs' RoPE'd feature maps then see shifted positions)."""
    @functools.wraps(base_model.forward)
    def forward(self, *args, **kwargs):
        return LinearizedModelMixin.forward(self, *args, **kwargs)

    return forward


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
                   {"config_class": cfg, BASE_CLASS_ATTR: base_model, "__module__": __name__,
                    "forward": _forward_with_signature(base_model)})
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
