"""Convert a loaded model and back: the module surgery (`surgery`) plus the class change
that lets `save_pretrained` / `from_pretrained` round-trip it. `unconvert` puts the original
modules and classes back, so the model is bit-for-bit what it was; `teacher(model)` runs the
original softmax attention without a second copy of the weights.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from .config import LinearizeConfig
from .families import decoder_layers
from .hf_classes import auto_map, linearized_classes
from .mixers import LinearizedAttention
from .state import STATE_ATTR, is_linearized, is_new_parameter, linearize_state
from .surgery import linearize_modules

__all__ = ["convert", "unconvert", "teacher", "mixers", "new_parameters", "is_linearized", "linearize_state"]


def mixers(model: nn.Module) -> list[LinearizedAttention]:
    """The mixer modules of a converted model, in layer order."""
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]


def convert(model: nn.Module, config: LinearizeConfig | None = None, **overrides) -> nn.Module:
    """Linearize a loaded transformers causal LM in place and return it.

    Args:
        model: e.g. a `LlamaForCausalLM`; families in `linearize.families.FAMILIES`.
        config: the conversion; or pass its fields as keyword arguments
            (`convert(model, method="lizard", window=128)`).

    Returns the same model object, whose class becomes `Linearized<Base>ForCausalLM` so that
    `save_pretrained` / `AutoModelForCausalLM.from_pretrained` round-trip it.
    """
    if config is None:
        config = LinearizeConfig(**overrides)
    elif overrides:
        raise TypeError("pass either a LinearizeConfig or keyword fields, not both")
    if is_linearized(model):
        raise ValueError("model is already linearized; call linearize.unconvert(model) first")
    family = linearize_modules(model, config).family
    model_cls, config_cls = linearized_classes(family.model_type, type(model), type(model.config))
    model.config.__class__ = config_cls
    model.__class__ = model_cls
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Restore the original attention modules (bit for bit) and the original classes."""
    st = linearize_state(model)
    layers = decoder_layers(model, st.family)
    for i in st.layers:
        mixer = getattr(layers[i], st.family.attention_name)
        mixer.sync_teacher_projections()
        setattr(layers[i], st.family.attention_name, mixer._teacher_attention)
    st.hook.remove()
    ours = {"linearize": None, "linearize_base_model_type": None, "auto_map": auto_map()}
    for attr, value in ours.items():
        if hasattr(model.config, attr) and (value is None or getattr(model.config, attr) == value):
            delattr(model.config, attr)
    model.config.__class__ = st.original_config_class
    model.__class__ = st.original_model_class
    object.__delattr__(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def teacher(model: nn.Module, active: bool = True):
    """Run `model` as its original inside the block: softmax attention back on in every
    converted layer and, on a peft `PeftModel`, its adapters disabled.

    No weights are copied: the mixers route to the original modules, which share the same
    projections. On a model that is neither converted nor a peft model this does nothing, and
    so does `active=False` (for code that runs one role or the other: `teacher(m, role == "teacher")`).
    """
    is_peft = active and hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")
    with model.disable_adapter() if is_peft else contextlib.nullcontext():
        base = model.get_base_model() if is_peft else model
        if not (active and is_linearized(base)):
            yield model
            return
        st = linearize_state(base)
        found = mixers(base)
        previous = [m.teacher_active for m in found], st.teacher_active
        for m in found:
            m.teacher_active = True
        st.teacher_active = True
        try:
            yield model
        finally:
            for m, was in zip(found, previous[0]):
                m.teacher_active = was
            st.teacher_active = previous[1]


def new_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that conversion added (stage-1 trainables)."""
    return [(n, p) for n, p in model.named_parameters() if is_new_parameter(n)]
