"""Liger: linearize with parameter-free gates built from the key projection.

Liger-GLA: phi = softmax over the head dimension on q and k, log a_t = logsigmoid(k_t)/16,
no normalizer, as the official code (OpenSparseLLMs/Linearization) has it. Liger-HGRN2:
q = softmax(q), the key is tied to the gate, k' = 1 - a_t. Deviation: our HGRN2 divides the
log gate by 16 as the GLA variant does, where the official HGRN2 does not (measured: better
untrained). Without a normalizer the GLA state grows like a running sum over ~1k tokens
(softmax(k) puts most mass in channels whose gate is ~1); `normalize=True` divides by
phi(q).z instead, and `init='baseline'` starts from the window + sinks baseline with learned
branch weights (window 1, recurrence 0) under the fixed 0.5 / 0.5.
By default both run as Liger Attention: 0.5 * window softmax (64 tokens, RoPE) + 0.5 * the
recurrence; window=0 gives the pure recurrent form. Nothing new is learned: the model is
usable straight after conversion and LoRA on q/k/v recovers the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import LigerGLA, LigerHGRN2
from .base import LinearizedAttention


class LigerGLAAttention(LinearizedAttention):
    method = LigerGLA


class LigerHGRN2Attention(LinearizedAttention):
    method = LigerHGRN2

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor, k_raw: torch.Tensor):
        fq = self.linearize_feature_map_q(q)
        log_a = F.logsigmoid(k_raw.float()) / self.lconfig.gate_normalizer
        fk = -torch.expm1(log_a)  # 1 - a_t: input gate tied to the forget gate
        return fq, fk.to(q.dtype)
