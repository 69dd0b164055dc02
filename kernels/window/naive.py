"""Reference sliding-window softmax attention with sink tokens and sink logits.

Query t attends key s when s is valid, s <= t, and either t - s < window or s is one of
the first `num_sink_tokens` valid keys of its sequence. `sink_logits` are extra logits
(Lizard's meta-memory) that enter only the softmax denominator: they carry no value.
"""
from __future__ import annotations

import torch

from ..utils import check_softcap, check_window_inputs, sequence_spans, soft_cap


def window_mask(
    T: int,
    window: int | None,
    num_sink_tokens: int,
    key_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean attention mask [B or 1, T, T] (query, key) for one row of length T."""
    t = torch.arange(T, device=device)
    causal = t[None, :] <= t[:, None]
    if key_mask is None:
        allowed = causal
        if window is not None:
            near = (t[:, None] - t[None, :]) < window
            allowed = causal & (near | (t[None, :] < num_sink_tokens))
        return allowed.unsqueeze(0)
    valid = key_mask.bool()
    rank = valid.long().cumsum(-1) - 1  # index of each key among the valid keys of its row
    allowed = causal.unsqueeze(0) & valid[:, None, :]
    if window is not None:
        near = ((t[:, None] - t[None, :]) < window).unsqueeze(0)
        sink = (rank < num_sink_tokens)[:, None, :]
        allowed = allowed & (near | sink)
    return allowed


def naive_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window softmax attention computed densely, one sequence at a time.

    Args:
        q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv]; H % HKV == 0.
        window: keys within the last `window` positions (query included); None = full causal.
        num_sink_tokens: the first valid keys of each sequence stay visible to every query.
        sink_logits: [H] or [H, M] logits added to each row's softmax denominator only.
        scale: score scale, default D ** -0.5.
        key_mask: [B, T] bool, False marks padding (never attended, not a sink).
        cu_seqlens: [N + 1] packed sequence bounds (B == 1); attention never crosses them.
        softcap: c > 0 replaces each scaled score s by c * tanh(s / c) before masking and the
            softmax (Gemma-2); None leaves scores as they are. Sink logits are not capped.

    Returns:
        o: [B, T, H, Dv] in q's dtype (zeros for a query that sees nothing);
        lse: [B, T, H] fp32/fp64 log of the full softmax denominator (-inf when empty).
    """
    check_window_inputs(q, k, v, window, num_sink_tokens, sink_logits, key_mask, cu_seqlens)
    check_softcap(softcap)
    B, T, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(B, T, H, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    sinks = None
    if sink_logits is not None:
        sinks = sink_logits.to(acc).reshape(H, -1)
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        L = end - start
        if L == 0:
            continue
        qs = q[b, start:end].to(acc)
        ks = k[b, start:end].to(acc).repeat_interleave(G, dim=1)
        vs = v[b, start:end].to(acc).repeat_interleave(G, dim=1)
        km = None if key_mask is None else key_mask[b : b + 1, start:end]
        allowed = window_mask(L, window, num_sink_tokens, km, q.device)[0]  # [L, L]
        scores = soft_cap(torch.einsum("thd,shd->hts", qs, ks) * scale, softcap)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None, :].expand(H, L, sinks.shape[-1])], dim=-1)
        row_lse = torch.logsumexp(scores, dim=-1)  # [H, L]
        probs = torch.exp(scores - row_lse.unsqueeze(-1)).nan_to_num(0.0)
        o[b, start:end] = torch.einsum("hts,shd->thd", probs[..., :L], vs)
        lse[b, start:end] = row_lse.transpose(0, 1)
    return o.to(q.dtype), lse


def naive_window_max_score(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each query's largest score over the keys it attends (window and sink tokens), densely.

    q: [B, T, H, D]; k: [B, T, HKV, D]; softcap: scores soft-capped as in the window op. Returns m [B, T, H] (fp32, fp64 for fp64 inputs),
    -inf for a query that sees no key. LoLCATs weighs its window by e^(s - m).
    """
    check_window_inputs(q, k, k, window, num_sink_tokens, None, key_mask, cu_seqlens)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    m = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        L = end - start
        if L == 0:
            continue
        ks = k[b, start:end].to(acc).repeat_interleave(G, dim=1)
        km = None if key_mask is None else key_mask[b : b + 1, start:end]
        allowed = window_mask(L, window, num_sink_tokens, km, q.device)[0]
        scores = soft_cap(torch.einsum("thd,shd->hts", q[b, start:end].to(acc), ks) * scale, softcap)
        m[b, start:end] = scores.masked_fill(~allowed, float("-inf")).amax(-1).transpose(0, 1)
    return m


def naive_cached_window_attention(
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
    """A new chunk over a cached past, one query and one allowed key at a time (the reference
    of `cached_window_attention`; arguments and keys seen as documented there).

    Returns o [B, T, H, Dv] in q's dtype (zeros for a query that sees nothing), lse and the row
    max m [B, T, H] (fp32, fp64 for fp64 inputs; -inf when empty).
    """
    B, T, H, D = q.shape
    G = H // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    L = 0 if win_k is None else win_k.shape[1]
    o = torch.zeros(B, T, H, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    m = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    extra = None if sink_logits is None else sink_logits.to(acc).reshape(H, -1)
    for b in range(B):
        valid = [key_mask is None or bool(key_mask[b, c]) for c in range(T)]
        before = 0 if seen is None else int(seen[b])
        rank = [before + sum(valid[: c + 1]) - 1 for c in range(T)]
        for r in range(T):
            seen_keys = []  # (key [HKV, D], value [HKV, Dv]) pairs query r attends
            if sink_k is not None:
                seen_keys += [(sink_k[b, i], sink_v[b, i]) for i in range(sink_k.shape[1]) if sink_mask[b, i]]
            seen_keys += [(win_k[b, j], win_v[b, j]) for j in range(L) if win_mask[b, j] and (L - j) + r < window]
            seen_keys += [(k[b, c], v[b, c]) for c in range(r + 1)
                          if valid[c] and (r - c < window or rank[c] < num_sink_tokens)]
            for h in range(H):
                s = [soft_cap(scale * (q[b, r, h].to(acc) @ key[h // G].to(acc)), softcap) for key, _ in seen_keys]
                logits = s + ([] if extra is None else list(extra[h]))
                if not logits:
                    continue
                lse[b, r, h] = torch.logsumexp(torch.stack(logits), dim=0)
                if s:
                    m[b, r, h] = torch.stack(s).max()
                for sj, (_, val) in zip(s, seen_keys):
                    o[b, r, h] += torch.exp(sj - lse[b, r, h]) * val[h // G].to(acc)
    return o.to(q.dtype), lse, m
