"""Sliding-window softmax for new tokens that meet a cached past (decoding, chunked prefill).

The past is what a decode cache keeps of the window branch: the sink tokens' keys/values and
the keys/values at the L positions just before the chunk (padding included, flagged invalid).
New query r (0-based in the chunk) sees

- every cached sink key i with sink_mask[i];
- cached window key l with win_mask[l] and (L - l) + r < window (its distance in positions);
- new key c with key_mask[c], c <= r, and r - c < window or c a sink (its rank among the real
  tokens of the row, counting the `seen` ones before the chunk, is < num_sink_tokens).

`sink_logits` enter each row's softmax denominator only. A single valid non-sink token (the
decode step) takes a short path with no masks to build; longer chunks go in query blocks of
`QUERY_BLOCK` that each meet only the new keys within `window` of them (plus new sinks), so a
chunk costs O(T * (L + S + window + block)).
"""
from __future__ import annotations

import torch

from ..utils import soft_cap

QUERY_BLOCK = 256


def cached_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    num_sink_tokens: int = 0,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    win_k: torch.Tensor | None = None,
    win_v: torch.Tensor | None = None,
    win_mask: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window softmax of a new chunk over cached sinks, the cached window and its own keys.

    Args:
        q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv] the new chunk (after RoPE).
        window: keys within the last `window` positions (query included).
        num_sink_tokens: the first real tokens of each row stay visible to every query.
        sink_k, sink_v: [B, S, HKV, D / Dv] cached sink tokens; sink_mask: [B, S] bool (filled).
        win_k, win_v: [B, L, HKV, D / Dv] the L positions before the chunk; win_mask: [B, L]
            bool, the entries a query may see (real, and not a sink already in sink_k).
        seen: [B] long, real tokens before the chunk (None: none).
        sink_logits: [H] or [H, M] extra logits of the denominator; scale: default D ** -0.5.
        key_mask: [B, T] bool, False = padding in the chunk.
        softcap: scores capped to c * tanh(s / c) before the softmax (Gemma-2); None = no cap.

    Returns:
        o [B, T, H, Dv] in q's dtype, lse [B, T, H] fp32 (sink logits included) and each row's
        largest score m [B, T, H] fp32 (sink logits excluded; -inf for a row that sees nothing).
    """
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values, masks = _cached_keys(sink_k, sink_v, sink_mask, win_k, win_v, win_mask)
    L = 0 if win_k is None else win_k.shape[1]
    if T == 1 and key_mask is None and (num_sink_tokens == 0 or seen is not None and bool(
            (seen >= num_sink_tokens).all())):
        return _attend_one(q, k, v, keys, values, masks, sink_logits, scale, softcap)
    valid = torch.ones(q.shape[0], T, dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    new_sink = _new_sinks(valid, seen, num_sink_tokens)
    sink_end = int(new_sink.any(0).nonzero().max()) + 1 if bool(new_sink.any()) else 0
    blocks = []
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(T, t0 + QUERY_BLOCK)
        lo = max(0, t0 - window + 1)
        cols = torch.cat([torch.arange(min(sink_end, lo), device=q.device), torch.arange(lo, t1, device=q.device)])
        blocks.append(_attend(q[:, t0:t1], torch.arange(t0, t1, device=q.device), cols, k, v, valid, new_sink,
                              keys, values, masks, L, window, sink_logits, scale, softcap))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*blocks))


def _cached_keys(sink_k, sink_v, sink_mask, win_k, win_v, win_mask):
    """The cached keys, values and masks a chunk meets, as lists in key order: the sinks
    ([B, S, HKV, D / Dv], mask [B, S]) when cached, then the window ([B, L, ...], mask [B, L])
    when it holds any position."""
    keys, values, masks = [], [], []
    if sink_k is not None:
        keys.append(sink_k)
        values.append(sink_v)
        masks.append(sink_mask)
    if win_k is not None and win_k.shape[1] > 0:
        keys.append(win_k)
        values.append(win_v)
        masks.append(win_mask)
    return keys, values, masks


def _new_sinks(valid: torch.Tensor, seen: torch.Tensor | None, num_sink_tokens: int) -> torch.Tensor:
    """[B, T] bool: the chunk's tokens that are sinks, real tokens (valid [B, T]) whose rank
    among the real tokens of the row, counting the `seen` [B] (or None: 0) before the chunk, is
    below num_sink_tokens."""
    before = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device) if seen is None else seen
    rank = before[:, None] + valid.long().cumsum(-1) - 1
    return valid & (rank < num_sink_tokens)


def _attend_one(q, k, v, keys, values, masks, sink_logits, scale, softcap):
    """One new, valid, non-sink token (the decode step): q [B, 1, H, D] against every cached key
    (all within reach of it) and its own key. Returns o [B, 1, H, Dv] (q's dtype), lse and the
    row max [B, 1, H] fp32."""
    B, _, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    keys, values = keys + [k], values + [v]
    masks = masks + [torch.ones(B, 1, dtype=torch.bool, device=q.device)]
    K = torch.cat(keys, dim=1).float().permute(0, 2, 3, 1)  # [B, HKV, D, N]
    V = torch.cat(values, dim=1).float().transpose(1, 2)  # [B, HKV, N, Dv]
    N = V.shape[2]
    scores = soft_cap(torch.matmul(q.float().view(B, HKV, G, D), K).mul_(scale), softcap)  # [B, HKV, G, N]
    scores.masked_fill_(~torch.cat(masks, dim=1)[:, None, None, :], float("-inf"))
    row_max = scores.amax(-1)
    if sink_logits is not None:
        extra = sink_logits.float().reshape(HKV, G, -1)[None].expand(B, HKV, G, -1)
        scores = torch.cat([scores, extra], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)  # finite: the token's own key is always allowed
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()[..., :N]
    o = torch.matmul(probs, V)  # [B, HKV, G, Dv]
    return o.reshape(B, 1, H, -1).to(q.dtype), lse.reshape(B, 1, H), row_max.reshape(B, 1, H)


def _attend(q, rows, cols, k, v, valid, new_sink, keys, values, masks, L, window, sink_logits, scale, softcap):
    """Queries q [B, R, H, D] at new positions `rows` against the cached keys and the new keys at
    positions `cols`; returns o [B, R, H, Dv] (q's dtype), lse and the row max [B, R, H] fp32."""
    B, R, H, D = q.shape
    HKV = k.shape[2]
    k, v, valid, new_sink = k[:, cols], v[:, cols], valid[:, cols], new_sink[:, cols]
    new_allowed = valid[:, None, :] & (cols[None, None, :] <= rows[None, :, None]) & (
        ((rows[:, None] - cols[None, :]) < window)[None] | new_sink[:, None, :])
    masks = [m[:, None, :].expand(B, R, -1) for m in masks]
    if L:
        dist = (L - torch.arange(L, device=q.device))[None, :] + rows[:, None]  # [R, L]
        masks[-1] = masks[-1] & (dist < window)[None]
    keys, values, masks = keys + [k], values + [v], masks + [new_allowed]
    K = torch.cat([x.to(q.dtype) for x in keys], dim=1).float()
    V = torch.cat([x.to(v.dtype) for x in values], dim=1).float()
    allowed = torch.cat(masks, dim=-1)  # [B, R, S]
    G = H // HKV
    scores = soft_cap(torch.einsum("bthgd,bshd->bhgts", q.float().view(B, R, HKV, G, D), K) * scale, softcap)
    scores = scores.reshape(B, H, R, -1).masked_fill(~allowed[:, None], float("-inf"))
    row_max = scores.amax(-1)  # [B, H, R]
    if sink_logits is not None:
        extra = sink_logits.float().reshape(H, -1)[None, :, None, :].expand(B, H, R, -1)
        scores = torch.cat([scores, extra], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, R]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)[..., : K.shape[1]]
    o = torch.einsum("bhgts,bshd->bthgd", probs.view(B, HKV, G, R, -1), V).reshape(B, R, H, -1)
    return o.to(q.dtype), lse.transpose(1, 2), row_max.transpose(1, 2)
