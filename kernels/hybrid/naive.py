"""Reference intra-layer hybrid and LoLCATs / LoLA past-window references, in fp64 from their
definitions (the combination rules are documented in `combine`)."""
from __future__ import annotations

import torch

from ..gla.naive import naive_gla
from ..utils import sequence_spans, soft_cap
from ..window.naive import naive_window_attention
from .combine import compose_hybrid


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
    cache_heads: int | None = None,
) -> torch.Tensor:
    """LoLA's sparse cache on LoLCATs' hybrid, from its definition (the fp64 reference): the
    sets of exact and linear tokens are kept as lists and every sum is written out.

    Per row and cache head c (a group of state heads; by default each state head is its own
    group), over real tokens by rank: at every rank a > 0 that is a multiple of `block`, the
    non-sink tokens j <= a - window not yet placed and the cached tokens compete on
    e_j = sqrt(sum over the group's state heads s of |v_j - sum_i w_ij v_i / sum_i w_ij|^2) with
    w_ij = phi_s(k_j).(d_ai * phi_s(k_i)) over the state's tokens i (the prediction is 0 when the
    sum of w is 0), d_ai = exp(sum of g_s over ranks i + window + 1 .. a); the `budget`
    largest (ties: the earlier) stay cached, the rest join every state of the group. Query t of
    head h (state head s, cache head c) then sees the sinks (ranks < num_sink_tokens), c's
    cached tokens and every unplaced token <= t exactly:
    o_t = (gamma sum_E e^(s_tj - m_t) v_j + lam sum_state a_ti v_i)
          / (gamma sum_E e^(s_tj - m_t) + lam sum_state a_ti), a_ti = phi(q_t).(d_ti phi_s(k_i)).

    Shapes as `naive_past_window_attention` (k_lin [B, T, Hs, F] with Hs = H or HKV; g
    [B, T, HKV or Hs(, F)]); softcap caps the exact scores s_tj as c tanh(s_tj / c);
    cache_heads: Hc, a multiple of HKV dividing Hs (None: Hs).
    Returns o [B, T, H, V] in q_win's dtype (0 at padding).
    """
    B, T, H, D = q_win.shape
    acc = torch.float64 if q_win.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else scale
    gam = torch.as_tensor(window_factor, dtype=acc).expand(H)
    lam = torch.as_tensor(linear_factor, dtype=acc).expand(H)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=acc, device=q_win.device)
    Hs, HKV = k_lin.shape[2], k_win.shape[2]
    Hc = Hs if cache_heads is None else cache_heads
    for b in range(B):
        pos = [t for t in range(T) if key_mask is None or bool(key_mask[b, t])]
        n = len(pos)

        def log_gates(s):
            if g is None:
                return torch.zeros(n, 1, dtype=acc)
            gs = g[b, pos, s // (Hs // g.shape[2])].to(acc)
            return torch.cumsum(gs.reshape(n, -1), dim=0)

        L = [log_gates(s) for s in range(Hs)]
        val = lambda j, kv: v[b, pos[j], kv].to(acc)  # noqa: E731
        fk = lambda j, s: k_lin[b, pos[j], s].to(acc)  # noqa: E731
        decay = lambda s, t, i: torch.exp(L[s][t] - L[s][i + window])  # noqa: E731
        placement = [_sparse_placement(n, range(c * (Hs // Hc), (c + 1) * (Hs // Hc)), c // (Hc // HKV), val, fk,
                                       decay, window, num_sink_tokens, budget, block, acc) for c in range(Hc)]
        for h in range(H):
            s, kv = h // (H // Hs), h // (H // HKV)
            for t in range(n):
                cached, in_state, placed = placement[s // (Hs // Hc)][t]
                exact = [j for j in range(t + 1) if j < num_sink_tokens or j in cached or j not in placed]
                sc = soft_cap(torch.stack([(q_win[b, pos[t], h].to(acc) @ k_win[b, pos[j], kv].to(acc)) * scale
                                           for j in exact]), softcap)
                w = gam[h] * torch.exp(sc - sc.max())
                num = sum(wj * val(j, kv) for wj, j in zip(w, exact))
                den = w.sum()
                for i in in_state:
                    a = lam[h] * (q_lin[b, pos[t], h].to(acc) @ (decay(s, t, i) * fk(i, s)))
                    num = num + a * val(i, kv)
                    den = den + a
                o[b, pos[t], h] = num / den
    return o.to(q_win.dtype)


def _sparse_placement(n, heads, kv, val, fk, decay, window, num_sink_tokens, budget, block, acc):
    """For each rank t < n, the (cached, in_state, placed) token lists of one cache head (its
    state heads `heads`, KV head kv) after the selection before query t."""
    cached, in_state, placed, out = [], [], set(), []
    for t in range(n):
        if t > 0 and t % block == 0:
            pending = [j for j in range(num_sink_tokens, t - window + 1) if j not in placed]
            if pending:
                def error(j):
                    total_sq = 0.0
                    for s in heads:
                        w = [fk(j, s) @ (decay(s, t, i) * fk(i, s)) for i in in_state]
                        total = sum(w) if w else torch.zeros((), dtype=acc)
                        pred = sum(wi * val(i, kv) for wi, i in zip(w, in_state)) / total if total > 0 else 0.0
                        total_sq += float(torch.linalg.vector_norm(val(j, kv) - pred)) ** 2
                    return total_sq ** 0.5
                errors = {j: error(j) for j in cached + pending}
                ranked = sorted(cached + pending, key=lambda j: (-errors[j], j))
                cached = sorted(ranked[:budget])
                in_state = in_state + ranked[budget:]
                placed = placed | set(pending)
        out.append((cached, in_state, placed))
    return out
