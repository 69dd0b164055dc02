"""What `convert` records on a model: the resolved config, the layers it converted, the
forward-context hook and the original classes (for `unconvert` and the decode cache)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: every module may import this one
    import torch.nn as nn

    from .config import LinearizeConfig
    from .families import Family
    from .mixers.context import ForwardContext

STATE_ATTR = "_linearize_state"
# On a Linearized<Base> class: the class it was made from (what unconvert restores).
BASE_CLASS_ATTR = "_linearize_base_class"
# Every parameter conversion adds has a name part starting with this (peft's "lora_"), so
# checkpoints, optimizers and dtype rules find them by name.
NEW_PARAMETER_PREFIX = "linearize_"


def is_new_parameter(name: str) -> bool:
    """Whether a parameter name (dotted, any wrapper prefix) is one that conversion added."""
    return any(part.startswith(NEW_PARAMETER_PREFIX) for part in name.split("."))


@dataclass
class LinearizeState:
    """What `convert` did to a model, kept on the model for `unconvert` and the cache."""

    config: LinearizeConfig  # resolved
    family: Family
    layers: list[int]
    num_layers: int
    context: ForwardContext
    hook: object
    original_model_class: type
    original_config_class: type
    teacher_active: bool = False
    extra: dict = field(default_factory=dict)


def linearize_state(model: nn.Module) -> LinearizeState:
    st = getattr(model, STATE_ATTR, None)
    if st is None:
        raise ValueError(f"{type(model).__name__} is not linearized: call linearize.convert(model, config) first")
    return st


def is_linearized(model: nn.Module) -> bool:
    """True when `model` has been converted by `linearize.convert`."""
    return getattr(model, STATE_ATTR, None) is not None
