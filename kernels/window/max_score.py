"""Blocked row maximum of sliding-window scores (device-agnostic PyTorch).

LoLCATs weighs its window terms by e^(s - m) with m the row's largest window score, so m is
part of the function (and of its gradient), not only a stabiliser. A query block meets only
the keys of its band plus the sink tokens before it: O(T * (window + block)) work.
"""
from __future__ import annotations

import torch

from ..utils import check_softcap, check_window_inputs, sequence_spans, soft_cap


def band_max_score(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    block_size: int = 64,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each query's largest score over the keys it attends (same rule as the window op).

    q: [B, T, H, D]; k: [B, T, HKV, D]; key_mask: [B, T] (False = padding); cu_seqlens:
    [N + 1] packed bounds (B == 1). Returns m [B, T, H] fp32 (fp64 for fp64 inputs), -inf
    for a query that sees no key; differentiable (torch.amax splits ties evenly). softcap:
    scores capped to c * tanh(s / c) as in the window op (None = none).
    """
    check_window_inputs(q, k, k, window, num_sink_tokens, None, key_mask, cu_seqlens)
    check_softcap(softcap)
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    parts = []
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        rows = slice(None) if cu_seqlens is None else slice(b, b + 1)
        qs, ks = q[rows, start:end].to(acc), k[rows, start:end].to(acc)
        km = None if key_mask is None else key_mask[rows, start:end].bool()
        parts.append(_span_max(qs, ks, km, window, num_sink_tokens, scale, block_size, softcap))
        if cu_seqlens is None:
            break
    m = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return m.reshape(B, T, H)


def _span_max(q, k, key_mask, window, num_sink_tokens, scale, block_size, softcap=None):
    """One sequence per row: q [B, L, H, D], k [B, L, HKV, D] -> m [B, L, H]."""
    B, L, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    dev = q.device
    valid = torch.ones(B, L, dtype=torch.bool, device=dev) if key_mask is None else key_mask
    rank = valid.long().cumsum(-1) - 1
    sink = valid & (rank < num_sink_tokens)
    sink_end = int(sink.any(0).nonzero().max()) + 1 if bool(sink.any()) else 0
    reach = L if window is None else window
    outs = []
    for t0 in range(0, L, block_size):
        t1 = min(L, t0 + block_size)
        lo = max(0, t0 - reach + 1)
        cols = torch.cat([torch.arange(min(sink_end, lo), device=dev), torch.arange(lo, t1, device=dev)])
        rows = torch.arange(t0, t1, device=dev)
        near = (rows[:, None] - cols[None, :]) < reach
        allowed = (cols[None, :] <= rows[:, None])[None] & valid[:, None, cols] & (near[None] | sink[:, None, cols])
        scores = torch.einsum("bphgd,bchd->bphgc", q[:, t0:t1].reshape(B, t1 - t0, HKV, G, D), k[:, cols]) * scale
        scores = soft_cap(scores, softcap)
        scores = scores.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
        outs.append(scores.amax(-1).reshape(B, t1 - t0, H))
    return torch.cat(outs, dim=1)
