"""Intra-layer hybrid on the CPU path: the chunked window and GLA ops, then one combination."""
from __future__ import annotations

import functools

from ..gla.torch_chunk import chunk_gla
from ..window.torch_chunk import chunk_window_attention
from .combine import compose_hybrid


def chunk_hybrid_attention(*args, mode: str = "mix", **kwargs):
    """Same arguments and results as `naive_hybrid_attention` (shapes documented there), computed
    with `chunk_window_attention` (without its lse in the "mix" mode, which does not use it) and
    `chunk_gla`."""
    window_op = functools.partial(chunk_window_attention, need_lse=mode != "mix")
    return compose_hybrid(window_op, chunk_gla, *args, mode=mode, **kwargs)
