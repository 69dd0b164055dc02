"""Reference intra-layer hybrid: sliding-window softmax and gated linear attention of one layer.

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

from ..gla.naive import naive_gla
from ..utils import sequence_spans, soft_cap
from ..window.naive import naive_window_attention

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


def naive_hybrid_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor,
    *,
    window: int | None,
    mode: str = "mix",
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale_win: float | None = None,
    scale_lin: float = 1.0,
    w_win: torch.Tensor | float | None = None,
    w_lin: torch.Tensor | float | None = None,
    c: torch.Tensor | float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Window softmax + gated linear attention of one layer, from the two naive references.

    Args:
        q_win: [B, T, H, D], k_win: [B, T, HKV, D] window queries/keys (e.g. after RoPE).
        v: [B, T, HKV, V] values shared by both branches.
        q_lin: [B, T, H, K], k_lin: [B, T, HKV, K] feature-mapped queries/keys.
        g: [B, T, HKV, K] or [B, T, HKV] log decay (<= 0).
        window, num_sink_tokens, sink_logits ([H] or [H, M]), scale_win: the window branch
            (see `naive_window_attention`); scale_lin multiplies the linear branch.
        mode: "mix" (weights w_win, w_lin: float or [H], default 0.5 each) or "shared"
            (c: float or [H] >= 0, default 1).
        key_mask: [B, T] bool, False = padding, invisible to both branches.
        cu_seqlens: [N + 1] packed sequences (B == 1).
        initial_state: [N, HKV, K, V] (mix) or [N, HKV, K, V + 1] (shared: S, then z).
        softcap: the window scores' cap c * tanh(s / c) (Gemma-2); the linear branch has no
            scores and is not capped. None = no cap.

    Returns:
        o: [B, T, H, V] in q_win's dtype; final_state like initial_state (fp32/fp64) or None.
    """
    return compose_hybrid(naive_window_attention, naive_gla, q_win, k_win, v, q_lin, k_lin, g, window=window,
                          mode=mode, num_sink_tokens=num_sink_tokens, sink_logits=sink_logits, scale_win=scale_win,
                          scale_lin=scale_lin, w_win=w_win, w_lin=w_lin, c=c, key_mask=key_mask,
                          cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                          softcap=softcap)


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


def naive_past_window_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor | None,
    *,
    window: int,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    window_factor: torch.Tensor,
    linear_factor: torch.Tensor | float = 1.0,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """LoLCATs as published, one query at a time from its equation (the fp64 reference).

    o_i = (gamma sum_{W(i)} e^(s_ij - m_i) v_j + lam sum_{L(i)} d_ij phi(q_i).phi(k_j) v_j)
          / (gamma sum_{W(i)} e^(s_ij - m_i) + lam sum_{L(i)} d_ij phi(q_i).phi(k_j)),
    W(i): real keys j <= i with i - j < window or among the first num_sink_tokens of the
    sequence; L(i): the other real keys j <= i; s_ij = scale q_i.k_j (then c tanh(s_ij / c) with
    softcap c); m_i = max over W(i);
    d_ij = exp(sum of g over steps j + window + 1 .. i) (1 without a gate).

    q_win [B, T, H, D], k_win [B, T, HKV, D], v [B, T, HKV, V], q_lin [B, T, H, F],
    k_lin [B, T, H or HKV, F], g [B, T, H or HKV(, F)] or None; window_factor,
    linear_factor: [H] or scalars. Returns o [B, T, H, V] in q_win's dtype.
    """
    B, T, H, D = q_win.shape
    acc = torch.float64 if q_win.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    gam = torch.as_tensor(window_factor, dtype=acc).expand(H)
    lam = torch.as_tensor(linear_factor, dtype=acc).expand(H)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=acc, device=q_win.device)
    for b, start, end in sequence_spans(B, T, cu_seqlens):
        valid = [key_mask is None or bool(key_mask[b, t]) for t in range(start, end)]
        rank = [sum(valid[: j + 1]) - 1 for j in range(end - start)]
        for i in range(end - start):
            for h in range(H):
                o[b, start + i, h] = _one_query(q_win, k_win, v, q_lin, k_lin, g, b, start, i, h, valid, rank,
                                                window, num_sink_tokens, scale, gam[h], lam[h], acc, softcap)
    return o.to(q_win.dtype)


def _one_query(q_win, k_win, v, q_lin, k_lin, g, b, start, i, h, valid, rank, window, num_sink_tokens, scale,
               gam, lam, acc, softcap=None):
    H = q_win.shape[2]
    kv_head = h // (H // k_win.shape[2])
    lin_head = h // (H // k_lin.shape[2])
    win, lin = [], []
    for j in range(i + 1):
        if not valid[j]:
            continue
        (win if (i - j < window or rank[j] < num_sink_tokens) else lin).append(j)
    num = torch.zeros(v.shape[-1], dtype=acc)
    den = torch.zeros((), dtype=acc)
    if win:
        s = torch.stack([(q_win[b, start + i, h].to(acc) @ k_win[b, start + j, kv_head].to(acc)) * scale for j in win])
        s = soft_cap(s, softcap)
        w = gam * torch.exp(s - s.max())
        num = num + sum(wj * v[b, start + j, kv_head].to(acc) for wj, j in zip(w, win))
        den = den + w.sum()
    for j in lin:
        fk = k_lin[b, start + j, lin_head].to(acc)
        if g is not None:
            g_head = h // (H // g.shape[2])
            gh = g[b, start + j + window + 1: start + i + 1, g_head].to(acc)
            fk = fk * torch.exp(gh.sum(0))
        a = lam * (q_lin[b, start + i, h].to(acc) @ fk)
        num = num + a * v[b, start + j, kv_head].to(acc)
        den = den + a
    return num / den if den > 0 else num


def naive_sparse_past_window_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor | None,
    *,
    window: int,
    num_sink_tokens: int = 0,
    budget: int,
    block: int,
    scale: float | None = None,
    window_factor: torch.Tensor,
    linear_factor: torch.Tensor | float = 1.0,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """LoLA's sparse cache on LoLCATs' hybrid, from its definition (the fp64 reference): the
    sets of exact and linear tokens are kept as lists and every sum is written out.

    Per row and query head h (state head s), over real tokens by rank: at every rank a > 0
    that is a multiple of `block`, the non-sink tokens j <= a - window not yet placed and the
    cached tokens compete on e_j = |v_j - sum_i w_ij v_i / sum_i w_ij| with
    w_ij = phi(k_j).(d_ai * phi(k_i)) over the state's tokens i (the prediction is 0 when the
    sum of w is 0), d_ai = exp(sum of g_s over ranks i + window + 1 .. a); the `budget`
    largest (ties: the earlier) stay cached, the rest join the state. Query t then sees the
    sinks (ranks < num_sink_tokens), the cached tokens and every unplaced token <= t exactly:
    o_t = (gamma sum_E e^(s_tj - m_t) v_j + lam sum_state a_ti v_i)
          / (gamma sum_E e^(s_tj - m_t) + lam sum_state a_ti), a_ti = phi(q_t).(d_ti phi(k_i)).

    Shapes as `naive_past_window_attention` (k_lin [B, T, Hs, F] with Hs = H or HKV; g
    [B, T, HKV or Hs(, F)]); softcap caps the exact scores s_tj as c tanh(s_tj / c).
    Returns o [B, T, H, V] in q_win's dtype (0 at padding).
    """
    B, T, H, D = q_win.shape
    acc = torch.float64 if q_win.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    gam = torch.as_tensor(window_factor, dtype=acc).expand(H)
    lam = torch.as_tensor(linear_factor, dtype=acc).expand(H)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=acc, device=q_win.device)
    Hs, HKV = k_lin.shape[2], k_win.shape[2]
    for b in range(B):
        pos = [t for t in range(T) if key_mask is None or bool(key_mask[b, t])]
        for h in range(H):
            s, kv = h // (H // Hs), h // (H // HKV)
            if g is None:
                L = torch.zeros(len(pos), 1, dtype=acc)
            else:
                gs = g[b, pos, s // (Hs // g.shape[2])].to(acc)
                L = torch.cumsum(gs.reshape(len(pos), -1), dim=0)
            key = lambda j: k_win[b, pos[j], kv].to(acc)  # noqa: E731
            val = lambda j: v[b, pos[j], kv].to(acc)  # noqa: E731
            fk = lambda j: k_lin[b, pos[j], s].to(acc)  # noqa: E731
            decay = lambda t, i: torch.exp(L[t] - L[i + window])  # noqa: E731
            cached, in_state, placed = [], [], set()
            for t in range(len(pos)):
                if t > 0 and t % block == 0:
                    pending = [j for j in range(num_sink_tokens, t - window + 1) if j not in placed]
                    if pending:
                        def error(j):
                            w = [fk(j) @ (decay(t, i) * fk(i)) for i in in_state]
                            total = sum(w) if w else torch.zeros((), dtype=acc)
                            pred = sum(wi * val(i) for wi, i in zip(w, in_state)) / total if total > 0 else 0.0
                            return float(torch.linalg.vector_norm(val(j) - pred))
                        errors = {j: error(j) for j in cached + pending}
                        ranked = sorted(cached + pending, key=lambda j: (-errors[j], j))
                        cached = sorted(ranked[:budget])
                        in_state += ranked[budget:]
                        placed.update(pending)
                exact = [j for j in range(t + 1) if j < num_sink_tokens or j in cached or j not in placed]
                sc = soft_cap(torch.stack([(q_win[b, pos[t], h].to(acc) @ key(j)) * scale for j in exact]), softcap)
                w = gam[h] * torch.exp(sc - sc.max())
                num = sum(wj * val(j) for wj, j in zip(w, exact))
                den = w.sum()
                for i in in_state:
                    a = lam[h] * (q_lin[b, pos[t], h].to(acc) @ (decay(t, i) * fk(i)))
                    num = num + a * val(i)
                    den = den + a
                o[b, pos[t], h] = num / den
    return o.to(q_win.dtype)
