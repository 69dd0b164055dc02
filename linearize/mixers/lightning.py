"""Lightning-style decay (TransNormerLLM, Lightning Attention-2, MiniMax-01) as the linear
branch of a window + sinks hybrid.

Per state head h of layer l (of L), a decay fixed before any data is seen:

    S_t = lambda_h S_{t-1} + phi(k_t)^T v_t,   z_t = lambda_h z_{t-1} + phi(k_t),
    o_lin = phi(q_t) S_t / phi(q_t) z_t,
    lambda_h = exp(-s_h (1 - l / (L - 1) + 1e-5)),

s_h the ALiBi slopes (2^(-8 i / n) for n heads, `linearize.mixers.gates.alibi_slopes`), scaled
by depth as the official TransNormerLLM / MiniMax code does: the first layer forgets fastest,
the last keeps an almost undecayed sum. It is the `lightning` gate, a log gate constant over
tokens and channels, so the GLA kernels (and the fused hybrid kernel) run it unchanged; padded
steps decay nothing (g = 0 there) and write nothing, as with every gate.

Deviations, and why: the published layers compute q, k, v = silu(x W) with fresh projections
and put an RMSNorm (learned weight) and a sigmoid output gate after the recurrence; a conversion
keeps the pretrained projections, so this method takes Liger's parameter-free softmax maps on
the raw q, k (scale 1) and mixes the branch 0.5 / 0.5 with a 64-token window + 4 sinks, like
Liger Attention (the window and sinks stand in for the softmax layers MiniMax interleaves).
The output norm becomes the recurrence's own normalizer phi(q).z, which needs no parameter and
keeps o_lin at a value's scale where the depth rule leaves almost no decay: untrained SmolLM2-135M
at 1,024 tokens measured perplexity 58.5 normalized against 3.3e5 without (`normalize=False`,
Liger's form; teacher 12.1, window + sinks 13.6).
With GQA state sharing the slopes are those of the H_kv state heads (the paper has one per head
of a multi-head layer). The decay holds no parameters, so the converted model needs no stage 1.
"""
from __future__ import annotations

from ..methods import Lightning
from .base import LinearizedAttention


class LightningAttention(LinearizedAttention):
    method = Lightning
