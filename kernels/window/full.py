"""Exact causal softmax attention of new queries over every key before them (no window), the
head-level hybrid's kept heads (`linearize.mixers.full_heads`): the teacher's math, scaled dot
product of RoPE'd q and k, causal, softmax over all valid keys.

It is the window op with the window removed (`naive_window_attention(window=None)` is its fp64
reference), over a past of any length: the keys are the past, then the T new tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import soft_cap


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, *,
                    scale: float, cu_seqlens: torch.Tensor | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Causal softmax attention of the T new queries over L >= T keys (the past, then the T
    new tokens).

    q [B, T, Hq, D]; k, v [B, L, Hk, D] with Hq a multiple of Hk (query head i reads KV head
    i // (Hq / Hk)); key_valid [B, L] bool (False: padding, never attended) or None; cu_seqlens
    [N + 1] packed-sequence bounds (no past, B = 1) or None; softcap: Gemma-2's c tanh(s / c).
    A query sees itself even when padded, so no row is empty. Returns o [B, T, Hq, D] in q's dtype.
    """
    Hq = q.shape[2]
    if Hq != k.shape[2]:
        k = k.repeat_interleave(Hq // k.shape[2], dim=2)
        v = v.repeat_interleave(Hq // v.shape[2], dim=2)
    allowed = _allowed_keys(q.shape[0], q.shape[1], k.shape[1], key_valid, cu_seqlens, q.device)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap is None:
        o = F.scaled_dot_product_attention(qh, kh.to(q.dtype), vh.to(q.dtype), attn_mask=allowed[:, None], scale=scale)
    else:
        s = soft_cap(torch.matmul(qh, kh.to(q.dtype).transpose(-1, -2)) * scale, softcap)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        o = torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), vh.to(q.dtype))
    return o.transpose(1, 2)


def _allowed_keys(B: int, T: int, L: int, key_valid: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  device) -> torch.Tensor:
    """Mask [B, T, L] of the keys each new query (at positions L - T .. L - 1) attends: the valid
    ones at or before it in its own packed sequence, and itself always."""
    qpos = torch.arange(L - T, L, device=device)[:, None]
    kpos = torch.arange(L, device=device)[None, :]
    allowed = (kpos <= qpos).expand(B, T, L)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    if cu_seqlens is not None:
        seg = torch.zeros(L, dtype=torch.long, device=device)
        seg[cu_seqlens[1:-1]] = 1
        seg = seg.cumsum(0)
        allowed = allowed & (seg[L - T:][:, None] == seg[None, :])
    return allowed | (kpos == qpos)
