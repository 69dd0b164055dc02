"""Based (Arora et al. 2024, HazyResearch/based) as the linear branch of a window + sinks hybrid.

Per state head, on the raw (un-RoPE'd) pretrained q and k projected by a learned W_h [D, d]
(d = 16) and mapped by the 2nd-order Taylor expansion of exp (`TaylorFeatureMap`):

    o_lin = phi(q_t) sum_{j<=t} phi(k_j)^T v_j / phi(q_t) sum_{j<=t} phi(k_j),
    phi(q).phi(k) = 1 + s + s^2 / 2,  s = q W . k W / sqrt(d),

with 1 + d + d^2 = 273 key features, so the state per head is 273 x (D + 1) fp32 numbers.
Mixing as lizard: o = w_win * window softmax (64 tokens + 4 sinks, RoPE) + w_lin * o_lin with
learned per-head weights, 0.5 / 0.5 (`init='paper'`) or 1 / 0 (`init='baseline'`).

Deviations, and why: Based learns q, k projections to 16 features from scratch and keeps its
sliding-window layers (64 tokens) apart from its linear layers, with short convolutions beside
them; a conversion reuses the pretrained q, k (projected per head by W, starting at the first
16 channels), mixes window and recurrence within each layer, and leaves the convolutions out. The
window keeps 4 sink tokens, as our window + sinks baseline does: a converted model's heads lean
on the first tokens, which Based's window layers, trained without them, never learn to need.
Stage 1 trains the projections W and the branch weights.
"""
from __future__ import annotations

from ..methods import Based
from .base import LinearizedAttention


class BasedAttention(LinearizedAttention):
    method = Based
