"""LoLCATs: Hedgehog linear attention and a 64-token softmax window share one denominator,

    o = (sum_window e^{qk/sqrt(D)} v + c * phi(q) S) / (sum_window e^{qk/sqrt(D)} + c * phi(q) z),

with c = sigmoid(a) per head (a starts at logit(0.1), so a fresh model leans on the exact
window) and Hedgehog maps at the identity. The feature maps read RoPE-rotated q and k, as in
the public code.
"""
from __future__ import annotations

from .base import LinearizedAttention


class LolcatsAttention(LinearizedAttention):
    method = "lolcats"
