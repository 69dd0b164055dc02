"""Module surgery: swap every chosen attention module of a loaded model for its mixer.

PEFT-style: walk the decoder layers, build a mixer that holds the original projections by
reference, `setattr` it on the parent, and record what was done on the model (`state`).
`convert` adds the class change; a `Linearized<Base>` model calls this from `__init__`.
"""
from __future__ import annotations

import torch.nn as nn

from .config import ConfigError, LinearizeConfig
from .families import decoder_layers, family_of, get_submodule, layers_to_convert
from .mixers import MIXERS
from .mixers.context import ForwardContext
from .progress import bar
from .state import BASE_CLASS_ATTR, STATE_ATTR, LinearizeState


def linearize_modules(model: nn.Module, config: LinearizeConfig) -> LinearizeState:
    """Swap the attention modules `config` selects for mixers, in place; returns the state
    recorded on the model. The model's class is left as it is."""
    family = family_of(model)
    resolved = config.resolved()
    layers = decoder_layers(model, family)
    indices = layers_to_convert(family, model.config, resolved, len(layers))
    check_full_heads_fit(resolved, indices)
    context = ForwardContext()
    decoder = get_submodule(model, family.decoder_path)
    hook = decoder.register_forward_pre_hook(context.record, with_kwargs=True)
    mixer_cls = MIXERS[resolved.method]
    for i in bar(indices, desc="linearizing layers", unit="layer"):
        attn = getattr(layers[i], family.attention_name)
        weight = attn.o_proj.weight
        # in the model's mode (a new module starts in training mode)
        mixer = mixer_cls(attn, resolved, family, i, context).train(attn.training)
        for name, p in mixer.new_parameters():
            p.data = p.data.to(device=weight.device, dtype=weight.dtype)
        setattr(layers[i], family.attention_name, mixer)
    base_model_cls = getattr(type(model), BASE_CLASS_ATTR, type(model))
    base_config_cls = getattr(type(model.config), BASE_CLASS_ATTR, type(model.config))
    state = LinearizeState(resolved, family, indices, len(layers), context, hook, base_model_cls, base_config_cls)
    object.__setattr__(model, STATE_ATTR, state)
    model.config.linearize = resolved.to_dict()
    model.config.linearize_base_model_type = family.model_type
    return state


def check_full_heads_fit(config: LinearizeConfig, indices: list[int]) -> None:
    """ConfigError, before any layer is swapped, when full_attention_heads names a layer this
    conversion leaves as it is (in softmax_layers, or a layer the family keeps). Head indices
    are checked by each mixer against its own KV heads (`LinearizeConfig.check_full_attention_heads`),
    also before any swap: the first mixer built checks every layer's heads."""
    missing = sorted(set(config.full_attention_heads) - set(indices))
    if missing:
        raise ConfigError(f"full_attention_heads names layers {missing} that this conversion does not linearize "
                          f"(it converts {len(indices)} layers: {indices}); drop them, every head there keeps "
                          "the model's own attention")
