"""LoLCATs' hybrid as published: a softmax window, and linear attention over the keys that
have left it, under one denominator (HazyResearch/lolcats, linear_window_attention_sw.py).

Per query i with window keys W(i) (the last `window` positions, plus sink tokens when
asked) and linear keys L(i) (every earlier non-sink key, i - j >= window):

    o_i = (gamma sum_{W(i)} e^(s_ij - m_i) v_j + lam sum_{L(i)} phi(q_i) phi(k_j) v_j)
          / (gamma sum_{W(i)} e^(s_ij - m_i) + lam sum_{L(i)} phi(q_i) phi(k_j))

with m_i the row's largest window score, gamma = sigmoid(w) per head (published) and lam = 1
(published) or a learned per-head factor. The linear keys are the same keys `window`
positions later, so the recurrence runs over *delayed* inputs: at step t it takes in
phi(k_{t - window}) and v_{t - window} (`delay_into_state`). A gate, when one is used, is
the current token's: a key decays from the step it leaves the window (the published method
has no gate). With the window's log-denominator lse and max m, the window mass is
gamma e^(lse - m), bounded by gamma (window + sinks): no exponential of a raw score is formed.
"""
from __future__ import annotations

import torch


def linear_key_mask(B: int, T: int, num_sink_tokens: int, key_mask: torch.Tensor | None,
                    cu_seqlens: torch.LongTensor | None, seen: torch.Tensor | None = None,
                    device=None) -> torch.Tensor:
    """[B, T] bool: tokens whose key may enter the linear state once it leaves the window
    (real tokens that are not sink tokens; sinks stay in the softmax branch for good).

    seen: [B] real tokens already consumed (decoding), so sink ranks continue across calls.
    """
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
    if num_sink_tokens == 0:
        return valid
    if cu_seqlens is not None:
        pos = torch.arange(T, device=device)
        starts = cu_seqlens[torch.searchsorted(cu_seqlens, pos, right=True) - 1]
        return valid & ((pos - starts) >= num_sink_tokens)[None]
    rank = valid.long().cumsum(-1) - 1
    if seen is not None:
        rank = rank + seen[:, None]
    return valid & (rank >= num_sink_tokens)


def delay_into_state(xs: list[torch.Tensor], keep: torch.Tensor, window: int, *,
                     tail: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                     cu_seqlens: torch.LongTensor | None = None):
    """Delay tensors by `window` steps along time: what the recurrence takes in at step t.

    xs: tensors [B, T, ...]; keep: [B, T] bool (which tokens may enter the state); tail: the
    `window` steps before the call (xs, keep), or only their oldest min(T, window), all that T
    steps read; None for a fresh sequence.
    Returns (delayed xs [B, T, ...] zeroed where nothing enters, delayed keep [B, T], and the
    last `window` steps, the next call's tail when the tail given was whole).
    """
    B, T = keep.shape
    if tail is None:
        tail = ([x.new_zeros(B, window, *x.shape[2:]) for x in xs], keep.new_zeros(B, window))
    ext = [torch.cat([t.to(x.dtype), x], dim=1) for t, x in zip(tail[0], xs)]
    ext_keep = torch.cat([tail[1], keep], dim=1)
    kept = ext_keep[:, :T]
    if cu_seqlens is not None:
        pos = torch.arange(T, device=keep.device)
        starts = cu_seqlens[torch.searchsorted(cu_seqlens, pos, right=True) - 1]
        kept = kept & ((pos - starts) >= window)[None]
    delayed = [e[:, :T] * _expand(kept, e) for e in ext]
    new_tail = ([e[:, -window:] for e in ext], ext_keep[:, -window:])
    return delayed, kept, new_tail


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype).reshape(*mask.shape, *([1] * (like.dim() - 2)))


def combine_past_window(o_win: torch.Tensor, lse: torch.Tensor, m: torch.Tensor, num: torch.Tensor,
                        den: torch.Tensor, window_factor: torch.Tensor,
                        linear_factor: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The shared denominator of both branches.

    o_win: [B, T, H, V] the window's softmax output; lse, m: [B, T, H] its log-denominator
    and row max (-inf when the window is empty); num: [B, T, H, V] and den: [B, T, H] the
    linear branch's phi(q) S and phi(q) z over the delayed keys; window_factor (gamma),
    linear_factor (lam): [H] or scalars >= 0. Returns o [B, T, H, V] in fp32 (fp64 stays),
    0 for a query with no mass in either branch.
    """
    acc = torch.float64 if o_win.dtype == torch.float64 else torch.float32
    lse, m, den = lse.to(acc), m.to(acc), den.to(acc)
    seen = torch.isfinite(m)
    shift = torch.where(seen, lse - torch.where(seen, m, torch.zeros_like(m)), torch.zeros_like(m))
    a = torch.where(seen, window_factor * torch.exp(shift), torch.zeros_like(shift))
    lam = linear_factor
    total = a + lam * den
    nonzero = total > 0
    total = torch.where(nonzero, total, torch.ones_like(total))
    o = (a[..., None] * o_win.to(acc) + _per_head(lam, acc)[..., None] * num.to(acc)) / total[..., None]
    return torch.where(nonzero[..., None], o, torch.zeros_like(o))


def _per_head(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=dtype)
