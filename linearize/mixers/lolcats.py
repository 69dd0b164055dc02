"""LoLCATs as published (HazyResearch/lolcats, `linear_window_attention_sw.py`): a 64-token
softmax window and Hedgehog linear attention over the keys that have *left* the window,
under one denominator,

    o_i = (gamma sum_{W(i)} e^(s_ij - m_i) v_j + lam sum_{L(i)} phi(q_i).phi(k_j) v_j)
          / (gamma sum_{W(i)} e^(s_ij - m_i) + lam sum_{L(i)} phi(q_i).phi(k_j)),

s_ij = q_i.k_j / sqrt(D) on RoPE'd q, k; m_i the row's largest window score; gamma =
sigmoid(w) per head, w starting at logit(0.1); lam = 1. phi = [softmax(xW) ++ softmax(-xW)]
on RoPE'd q and k, one map per query head (keys repeated to the query heads first), W
kaiming-initialised (`init='paper'`). Stage 1 matches the per-head outputs before o_proj,
MSE x 1000, as the published attention transfer does.

Options beyond the paper: `share_state_across_group=True` keeps one key map and state per KV
head (H/H_kv less state); sink tokens stay in the softmax branch and never enter the linear
one; a gate (scalar, mamba2) decays a key from the step it leaves the window. With
`init='baseline'`, lam becomes a learned per-head factor starting at 0 (kept >= 0, its
gradient passed straight through at the bound) and the window gets 4 sink tokens, so the
untrained model is exactly the window + sinks baseline.

With `sparse_cache=N` (LoLA, inference only): the N pairs per layer and state head that the
state reproduces worst stay exact beside the window instead of entering the state
(`linearize.kernels.hybrid.sparse_cache`; `linearize.set_sparse_cache` on a trained model).

Kernels: the window op (with its log-denominator), the row max of its scores and the GLA over
the delayed keys, each through the dispatcher (Triton on CUDA for the window and the GLA);
the fused hybrid kernel implements the Liger mix and the shared-denominator option, not
this rule. Decoding reads each key and value from the window cache as it leaves the window
(undoing its RoPE when the feature map reads keys before it) and maps it into the state.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..kernels import (combine_past_window, delay_into_state, linear_key_mask, linear_recurrence,
                       sliding_window_attention, sparse_past_window_attention, window_max_score)
from ..methods import Lolcats
from .base import DECODE_STEP_TOKENS, LinearizedAttention


class LolcatsAttention(LinearizedAttention):
    method = Lolcats
    transfer_on_heads = True
    transfer_scale = 1000.0

    def _build_method_parameters(self) -> None:
        cfg = self.lconfig
        if cfg.mixing != "lolcats":
            return
        for fmap in (self.linearize_feature_map_q, self.linearize_feature_map_k):
            if hasattr(fmap, "weight") and cfg.init == "paper":
                nn.init.kaiming_uniform_(fmap.weight)  # on [H, D, F], as the published FeatureMapMLP
        p = cfg.lolcats_init_window_factor
        self.linearize_window_logit = nn.Parameter(torch.full((self.num_heads,), math.log(p / (1 - p))))
        if cfg.init == "baseline":
            self.linearize_linear_factor = nn.Parameter(torch.zeros(self.num_heads))

    def window_factor(self) -> torch.Tensor:
        """gamma [H] (fp32, or fp64 for an fp64 model)."""
        w = self.linearize_window_logit
        return torch.sigmoid(w.to(torch.promote_types(w.dtype, torch.float32)))

    def linear_factor(self) -> torch.Tensor | float:
        """lam: 1 as published, or the learned per-head factor [H], clamped at 0 with the
        gradient passed straight through so that it can leave 0."""
        lam = getattr(self, "linearize_linear_factor", None)
        if lam is None:
            return 1.0
        lam = lam.to(torch.promote_types(lam.dtype, torch.float32))
        return lam + (lam.clamp_min(0) - lam).detach()

    def attention(self, hidden, q, k, v, q_rot, k_rot, key_mask, cu_seqlens, state, rope=None) -> torch.Tensor:
        cfg = self.lconfig
        if cfg.mixing != "lolcats":
            return super().attention(hidden, q, k, v, q_rot, k_rot, key_mask, cu_seqlens, state, rope)
        B, T = q.shape[:2]
        lin_q, lin_k = (q_rot, k_rot) if cfg.linear_rope else (q, k)
        kept_rotation = not cfg.linear_rope and (state is not None or cfg.sparse_cache)  # for undoing RoPE later
        halves = self._context.rope_halves(*rope) if kept_rotation else None
        if cfg.sparse_cache:
            return self.sparse_attention(hidden, lin_q, lin_k, k, q_rot, k_rot, v, key_mask, cu_seqlens, state, halves)
        seen = None if state is None else state.valid_seen
        keep = linear_key_mask(B, T, cfg.num_sink_tokens, key_mask, cu_seqlens, seen, device=q.device)
        window = self.window_now(state)
        # a decode cache's window holds the keys waiting to enter the state (unmapped, [B, W,
        # HKV, D], not the [B, W, Hs, F] of their features): they are mapped as they enter
        tail = None if state is None else state.pending_linear(min(T, window), window, unrotate=not cfg.linear_rope)
        o_win, lse, m = self.window_with_max(q_rot, k_rot, v, key_mask, cu_seqlens, state, halves)
        (k_late, v_in), kept, _ = delay_into_state([lin_k, v], keep, window, tail=tail, cu_seqlens=cu_seqlens)
        fq, k_in, g = self.linear_inputs(hidden, lin_q, k_late, k)
        k_in = k_in * kept.to(k_in.dtype)[..., None, None]
        initial = None if state is None else state.recurrent
        step = initial is not None and T <= DECODE_STEP_TOKENS
        num, den, final = linear_recurrence(fq, k_in, v_in, g, keep=kept, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                            initial_state=initial, output_final_state=state is not None, step=step)
        if state is not None:
            state.recurrent = final
        return combine_past_window(o_win, lse, m, num, den, self.window_factor(), self.linear_factor())

    def sparse_attention(self, hidden, lin_q, lin_k, k_raw, q_rot, k_rot, v, key_mask, cu_seqlens, state, halves):
        """With LoLA's sparse cache (`sparse_cache` > 0): the exact tokens are the sinks, the
        window (+ those waiting for the next selection) and the cached pairs. Meant for
        inference (distill refuses it: the selection has no gradient of its own). With the
        feature map before RoPE, the state keeps the waiting keys before RoPE and their
        rotation (halves: `rope_halves` [B | 1, T, D], None with the map after RoPE) rather than
        the keys twice."""
        cfg = self.lconfig
        fq, g = self.linearize_feature_map_q(lin_q), self.log_gate(hidden, k_raw, self.state_heads)
        previous = None if state is None else state.sparse
        k_rope = None if halves is None else halves.to(k_rot.dtype).expand(*k_rot.shape[:2], -1)
        o, new = sparse_past_window_attention(
            q_rot, k_rot, v, fq, lin_k, g, k_rope=k_rope, key_map=lambda x: self.linearize_feature_map_k(x).to(fq.dtype),
            state_heads=self.state_heads, window=cfg.window, num_sink_tokens=cfg.num_sink_tokens,
            budget=cfg.sparse_cache, block=cfg.sparse_block, scale=self.scaling, window_factor=self.window_factor(),
            linear_factor=self.linear_factor(), key_mask=key_mask, cu_seqlens=cu_seqlens, state=previous,
            softcap=self.softcap, cache_heads=self.sparse_cache_heads())
        if state is not None:
            state.keep_sparse(new)
        return o

    def sparse_cache_heads(self) -> int:
        """How many heads keep their own sparse-cache pairs: the state heads (LoLA), or the KV
        heads with `sparse_per_kv_head`."""
        return self.num_kv_heads if self.lconfig.sparse_per_kv_head else self.state_heads

    def extra_state_bytes(self) -> int:
        """Beyond the window cache: the key and value that leave it next (2 x HKV x D elements);
        with the sparse cache instead the cached pairs, sparse_cache x Hc x 3 D (RoPE'd and
        unmapped keys, values; Hc = `sparse_cache_heads`) and their gates per state head, and
        the recent tokens waiting for a selection. The rotation a state keeps with the feature
        map before RoPE is not counted here but in `rotation_state_bytes`."""
        cfg = self.lconfig
        if cfg.mixing != "lolcats":
            return 0
        elem = self.o_proj.weight.element_size()
        feat = self.linearize_feature_map_k.out_dim
        if not cfg.sparse_cache:  # the window's one more position
            return 2 * self.num_kv_heads * self.head_dim * elem
        gate_width = 4 * (feat if cfg.gate == "liger" else 1)  # fp32 cumulative log gate per token and head
        cached = cfg.sparse_cache * (self.sparse_cache_heads() * (3 * self.head_dim * elem + 8 + 1)
                                     + self.state_heads * gate_width)
        # recent tokens: up to window + block - 1 gates and, with the feature map after RoPE,
        # RoPE'd keys beside the unmapped ones (before RoPE the RoPE'd keys are redone from the
        # unmapped keys and the rotation); the keys and values of up to `block` tokens beyond
        # the window's (which the base count holds)
        rope_keys = self.num_kv_heads * self.head_dim * elem if cfg.linear_rope else 0
        recent = (cfg.window + cfg.sparse_block - 1) * (rope_keys + self.state_heads * gate_width)
        beyond = cfg.sparse_block * 2 * self.num_kv_heads * self.head_dim * elem
        return cached + recent + beyond

    def rotation_state_bytes(self) -> int:
        """With the feature map before RoPE, a decode state keeps each held key's rotation (half
        cos, half sin: D per position) to undo or redo it: the window's positions, or with the
        sparse cache the up to window + block - 1 waiting ones. Every layer's is the same, and
        a `LinearizeCache` keeps one copy for all of them (`cache.SharedRotations`)."""
        cfg = self.lconfig
        if cfg.mixing != "lolcats" or cfg.linear_rope:
            return 0
        positions = cfg.window + cfg.sparse_block - 1 if cfg.sparse_cache else cfg.window
        return positions * self.head_dim * self.o_proj.weight.element_size()

    def window_with_max(self, q, k, v, key_mask, cu_seqlens, state, halves):
        """The window's softmax output [B, T, H, V], log-denominator and row max [B, T, H]. A
        decode state keeps the key that leaves the window next, and with the feature map
        before RoPE each position's rotation (halves: `rope_halves` [B | 1, T, D], else None)."""
        cfg = self.lconfig
        win = dict(window=self.window_now(state), num_sink_tokens=cfg.num_sink_tokens)
        stored = dict(leaving=True, halves=halves)
        if state is not None and state.has_window_past():
            return state.window_attention(q, k, v, key_mask, sink_logits=None, scale=self.scaling,
                                          softcap=self.softcap, **win, **stored)
        o, lse = sliding_window_attention(q, k, v, scale=self.scaling, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                          need_lse=True, softcap=self.softcap, **win)
        m = window_max_score(q, k, scale=self.scaling, key_mask=key_mask, cu_seqlens=cu_seqlens,
                             softcap=self.softcap, **win)
        if state is not None:
            state.store_window(k, v, key_mask, **win, **stored)
        return o, lse, m
