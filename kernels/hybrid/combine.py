"""How the intra-layer hybrid combines its branches, shared by every backend: the per-head
weights, the NaN-free combination and `compose_hybrid`, the hybrid from one window op and one
GLA op.

Two ways to combine the branches, per query head h:

mode="mix" (Liger Attention, Lizard): o = w_win[h] * softmax_window(q_win, k_win, v)
    + w_lin[h] * gla(q_lin, k_lin, v, g); Liger uses 0.5 / 0.5.

mode="shared" (LoLCATs): one softmax denominator for both branches,
    o = (sum_window e^s v + c[h] * phi(q) S) / (sum_window e^s + c[h] * phi(q) z),
    with S, z the decayed sums of phi(k)^T v and phi(k) (z from a column of ones appended to
    v) and c[h] >= 0. With lse the window's log-denominator, num = phi(q) S, den = phi(q) z
    and M = max(lse, log(c * den)) it is evaluated as
    o = (e^(lse - M) o_window + c num e^(-M)) / (e^(lse - M) + c den e^(-M)),
    a convex combination of o_window and num / den with linear weight
    sigmoid(log(c den) - lse): no exponential of a score is formed and nothing exceeds 1
    for non-negative features (softmax, Hedgehog). c enters linearly, so the gradient at
    c = 0 is the true one. A row that sees no window key and no linear mass gives 0.
"""
from __future__ import annotations

import torch

MODES = ("mix", "shared")


def head_weights(w, H: int, default: float, like: torch.Tensor) -> torch.Tensor:
    """A per-head weight as an [H] tensor (a float, or an [H] tensor kept in the graph)."""
    if w is None:
        w = default
    if isinstance(w, torch.Tensor):
        if w.shape not in ((H,), ()):
            raise ValueError(f"per-head weights must be [H] = [{H}], got {tuple(w.shape)}")
        return w.to(like.dtype).expand(H)
    return torch.full((H,), float(w), dtype=like.dtype, device=like.device)


def combine_hybrid(
    o_win: torch.Tensor,
    lse: torch.Tensor,
    o_lin: torch.Tensor,
    *,
    mode: str,
    w_win: torch.Tensor,
    w_lin: torch.Tensor,
    c: torch.Tensor,
) -> torch.Tensor:
    """Combine the branch outputs (in the dtype of o_win; differentiable, NaN-free).

    o_win: [B, T, H, V]; lse: [B, T, H] (unused by "mix": may be None); o_lin: [B, T, H, V] (mix) or [B, T, H, V + 1]
    (shared: numerator columns, then the normalizer column); w_win, w_lin, c: [H].
    """
    if mode == "mix":
        return w_win[:, None] * o_win + w_lin[:, None] * o_lin
    V = o_win.shape[-1]
    num, den = o_lin[..., :V], o_lin[..., V]
    cden = c * den
    has_lin = cden > 0
    m = torch.where(has_lin, torch.maximum(lse, torch.log(torch.where(has_lin, cden, torch.ones_like(cden)))), lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    u = torch.exp(lse - m)
    e = torch.exp(-m)
    total = u + cden * e
    total = torch.where(total != 0, total, torch.ones_like(total))
    return (u[..., None] * o_win + (c * e)[..., None] * num) / total[..., None]


def check_hybrid_inputs(q_win, k_win, v, q_lin, k_lin, g, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q_win.shape[:3] != q_lin.shape[:3]:
        raise ValueError(f"q_win {tuple(q_win.shape)} and q_lin {tuple(q_lin.shape)} must agree on [B, T, H]")
    if k_win.shape[:3] != k_lin.shape[:3]:
        raise ValueError(f"k_win {tuple(k_win.shape)} and k_lin {tuple(k_lin.shape)} must agree on [B, T, HKV]")


def mask_linear_inputs(k_lin, g, key_mask):
    """Padding is invisible to the linear branch too: zero keys and zero log decay there."""
    if key_mask is None:
        return k_lin, g
    m = key_mask.to(k_lin.dtype)[:, :, None, None]
    return k_lin * m, g * (m if g.dim() == 4 else m[..., 0]).to(g.dtype)


def compose_hybrid(window_op, gla_op, q_win, k_win, v, q_lin, k_lin, g, *, window, mode="mix", num_sink_tokens=0,
                   sink_logits=None, scale_win=None, scale_lin=1.0, w_win=None, w_lin=None, c=None, key_mask=None,
                   cu_seqlens=None, initial_state=None, output_final_state=False, softcap=None):
    """The hybrid from one window op and one GLA op of the same signature (naive or chunked);
    arguments and results as in `naive_hybrid_attention`."""
    check_hybrid_inputs(q_win, k_win, v, q_lin, k_lin, g, mode)
    H = q_win.shape[2]
    acc = torch.float64 if q_win.dtype == torch.float64 else torch.float32
    o_win, lse = window_op(q_win, k_win, v, window=window, num_sink_tokens=num_sink_tokens, sink_logits=sink_logits,
                           scale=scale_win, key_mask=key_mask, cu_seqlens=cu_seqlens, softcap=softcap)
    k_lin, g = mask_linear_inputs(k_lin, g, key_mask)
    v_lin = v if mode == "mix" else torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o_lin, final_state = gla_op(q_lin, k_lin, v_lin, g, scale=scale_lin, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    ref = torch.empty(0, dtype=acc, device=q_win.device)
    o = combine_hybrid(o_win.to(acc), None if lse is None else lse.to(acc), o_lin.to(acc), mode=mode,
                       w_win=head_weights(w_win, H, 0.5, ref), w_lin=head_weights(w_lin, H, 0.5, ref),
                       c=head_weights(c, H, 1.0, ref))
    return o.to(q_win.dtype), final_state
