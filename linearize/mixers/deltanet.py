"""Gated DeltaNet (Yang et al. 2024) as the linear branch of a window + sinks hybrid.

Per KV head, on the raw (un-RoPE'd) pretrained q and k, L2-normalised per head:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_lin = q_t S_t,

beta_t = sigmoid(x_t W_beta + b_beta) per token and KV head (a new projection, zero weight and
zero bias: beta = 0.5 at the start, half of each key's old association overwritten per write),
log a_t from the Mamba2 gate (`linearize.mixers.gates.Mamba2Gate`, a ~1000-token memory at the
start). The state is an associative memory k -> v, so q_t S_t for a unit q already has the size
of a value, like the window's softmax average: the output scale is 1 (not the paper's
1/sqrt(D)). The paper's short convolutions and output gate are left out: the method reuses the
pretrained projections as they are. Padded tokens write nothing (beta = 0) and decay nothing.

Mixing as `lizard`: o = w_win * window softmax (64 tokens + 4 sinks, RoPE) + w_lin * o_lin
with learned per-head weights, 0.5 / 0.5 (`init='paper'`), or 1 / 0 (`init='baseline'`: the
untrained model is exactly window + sinks). Decoding carries the fp32 state [B, HKV, K, V]
(`share_state_across_group=False`: one per query head, keys repeated first) beside the window.
Kernels: `linearize.kernels.gated_delta_rule` (chunked WY form) and its decode step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import gated_delta_rule, recurrent_gated_delta_rule
from ..methods import GatedDeltaNet
from .base import DECODE_STEP_TOKENS, LinearizedAttention


class GatedDeltaNetAttention(LinearizedAttention):
    method = GatedDeltaNet

    def _build_method_parameters(self) -> None:
        if self.has_linear:
            self.linearize_beta = nn.Linear(self.config.hidden_size, self.num_kv_heads)
            nn.init.zeros_(self.linearize_beta.weight)
            nn.init.zeros_(self.linearize_beta.bias)

    def linear_branch(self, hidden, q, k, k_raw, v, key_mask, cu_seqlens, state):
        """The delta-rule recurrence. Returns o [B, T, H, V] and None (no normalizer)."""
        fq, fk, g = self.linear_inputs(hidden, q, k, k_raw)  # [B, T, H, K], [B, T, Hs, K], [B, T, HKV]
        beta = torch.sigmoid(self.linearize_beta(hidden).float())  # [B, T, HKV]
        if key_mask is not None:
            beta, g = beta * key_mask[..., None], g * key_mask[..., None]
        repeat = fk.shape[2] // self.num_kv_heads
        if repeat > 1:
            v, beta, g = (x.repeat_interleave(repeat, dim=2) for x in (v, beta, g))
        initial = state.recurrent if state is not None else None
        kwargs = dict(scale=1.0, initial_state=initial, output_final_state=state is not None)
        if initial is not None and fq.shape[1] <= DECODE_STEP_TOKENS:
            o, final = recurrent_gated_delta_rule(fq, fk, v.to(fq.dtype), beta, g, **kwargs)
        else:
            o, final = gated_delta_rule(fq, fk, v.to(fq.dtype), beta, g, cu_seqlens=cu_seqlens, **kwargs)
        if state is not None:
            state.recurrent = final
        return o, None
