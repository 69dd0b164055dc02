"""Intra-layer hybrid: window softmax and gated linear attention of one layer, mixed or with a
shared denominator. `naive_hybrid_attention` is the reference; `triton_hybrid_attention` (the
fused GPU kernel) is imported on first use so that importing this package needs no Triton."""
from .combine import MODES, combine_hybrid
from .naive import naive_hybrid_attention


def __getattr__(name):
    if name == "triton_hybrid_attention":
        from .triton_chunk import triton_hybrid_attention

        return triton_hybrid_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "combine_hybrid", "naive_hybrid_attention", "triton_hybrid_attention"]
