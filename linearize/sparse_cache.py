"""Turn LoLA's sparse cache on or off on a converted model (it needs no training)."""
from __future__ import annotations

import argparse
import dataclasses

import torch.nn as nn

from .state import linearize_state


def set_sparse_cache(model: nn.Module, budget: int | None, block: int | None = None,
                     per_kv_head: bool | None = None) -> nn.Module:
    """Keep `budget` exact key/value pairs per layer and state head beside the window (0 turns
    the cache off), selected every `block` tokens, per KV head shared by its group with
    `per_kv_head` (`LinearizeConfig.sparse_per_kv_head`); None keeps a value as it is. In place;
    the setting is saved with the model. Only the past-window hybrid (method lolcats) has a
    state that pairs leave the window into; other methods raise ConfigError.

    See `linearize.kernels.hybrid.sparse_cache` for what the cache computes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = linearize_state(base).config
    wanted = dataclasses.replace(config, sparse_cache=config.sparse_cache if budget is None else budget,
                                 sparse_block=config.sparse_block if block is None else block,
                                 sparse_per_kv_head=(config.sparse_per_kv_head if per_kv_head is None
                                                     else per_kv_head))  # validates the values
    wanted.check_sparse_cache()
    for name in ("sparse_cache", "sparse_block", "sparse_per_kv_head"):  # every mixer reads this object
        setattr(config, name, getattr(wanted, name))
    base.config.linearize = config.to_dict()
    return model


def pairs_kept_per(per_kv_head: bool) -> str:
    """What each set of sparse-cache pairs belongs to, for summaries and notes."""
    return "KV head (shared by its query heads)" if per_kv_head else "head"


def add_sparse_cache_arguments(group) -> None:
    """--sparse-cache / --sparse-block / --sparse-per-kv-head (LoLA; convert, eval, generate and
    info take them)."""
    group.add_argument("--sparse-cache", type=int, default=None, metavar="N",
                       help="LoLA's sparse cache (lolcats only, no training needed): keep the N key/value pairs per "
                            "layer and head that the recurrent state reproduces worst exact beside the window; 0 = off "
                            "(default: the conversion's, or as saved)")
    group.add_argument("--sparse-block", type=int, default=None, metavar="C",
                       help="run the sparse cache's selection every C tokens (default: the conversion's, 64, or as saved)")
    group.add_argument("--sparse-per-kv-head", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the sparse cache's pairs per KV head, shared by its query heads (chosen by their "
                            "errors together): H/H_kv times fewer stored pairs than LoLA's per-head cache (beyond "
                            "the paper); --no-sparse-per-kv-head keeps them per head as LoLA does (default: the "
                            "conversion's, or as saved)")
