"""Turn LoLA's sparse cache on or off on a converted model (it needs no training)."""
from __future__ import annotations

import torch.nn as nn

from .config import ConfigError
from .state import linearize_state


def set_sparse_cache(model: nn.Module, budget: int | None, block: int | None = None) -> nn.Module:
    """Keep `budget` exact key/value pairs per layer and state head beside the window (0 turns
    the cache off), selected every `block` tokens (None keeps a value as it is). In place;
    the setting is saved with the model. Only the past-window hybrid (method lolcats) has a
    state that pairs leave the window into; other methods raise ConfigError.

    See `linearize.kernels.hybrid.sparse_cache` for what the cache computes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = linearize_state(base).config
    budget = config.sparse_cache if budget is None else budget
    block = config.sparse_block if block is None else block
    for name, val, low in (("sparse_cache", budget, 0), ("sparse_block", block, 1)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {val!r}")
    if budget and config.mixing != "lolcats":
        raise ConfigError(f"sparse_cache needs the past-window hybrid (method lolcats, mixing='lolcats'); this model "
                          f"is {config.method} with mixing={config.mixing!r}: reconvert with method lolcats")
    config.sparse_cache, config.sparse_block = budget, block  # the one config object every mixer reads
    base.config.linearize = config.to_dict()
    return model
