"""Turn LoLA's sparse cache on or off on a converted model (it needs no training)."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

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
    wanted = dataclasses.replace(config, sparse_cache=config.sparse_cache if budget is None else budget,
                                 sparse_block=config.sparse_block if block is None else block)  # validates the values
    wanted.check_sparse_cache()
    config.sparse_cache, config.sparse_block = wanted.sparse_cache, wanted.sparse_block  # every mixer reads this object
    base.config.linearize = config.to_dict()
    return model
