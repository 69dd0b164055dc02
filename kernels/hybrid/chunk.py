"""Intra-layer hybrid on the CPU path: the chunked window and GLA ops, then one combination."""
from __future__ import annotations

import functools

from ..gla.chunk import chunk_gla
from ..window.chunk import chunk_window_attention
from .naive import compose_hybrid

chunk_hybrid_attention = functools.partial(compose_hybrid, chunk_window_attention, chunk_gla)
chunk_hybrid_attention.__doc__ = """Same arguments and results as `naive_hybrid_attention` (shapes documented
there), computed with `chunk_window_attention` and `chunk_gla`."""
