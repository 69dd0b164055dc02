"""Reference gated delta rule: a plain loop over time, exact in fp64.

S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * q_t S_t

with the state S [K, V] per key/value head; query head h reads the state of KV head
h // (H // HKV). Written straight from the equation (the K x K transition is formed
explicitly); it shares no code with the fast paths.
"""
from __future__ import annotations

import torch


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule, one time step at a time.

    Args:
        q: [B, T, H, K] queries; k: [B, T, HKV, K] keys (both usually L2-normalised);
            H % HKV == 0.
        v: [B, T, HKV, V] values.
        beta: [B, T, HKV] write strengths (usually in (0, 1)).
        g: [B, T, HKV] log decay per token and head, <= 0.
        scale: multiplies the output (None: K ** -0.5).
        initial_state: [N, HKV, K, V], N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: [N + 1] cumulative lengths of packed sequences (B == 1).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] (fp64 for fp64 inputs,
        else fp32) or None.
    """
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    scale = K ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, bf, gf = (x.to(acc) for x in (q, k, v, beta, g))
    eye = torch.eye(K, dtype=acc, device=q.device)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    o = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        S = [initial_state[n, h].to(acc) if initial_state is not None else torch.zeros(K, V, dtype=acc, device=q.device)
             for h in range(HKV)]
        for t in range(start, end):
            for h in range(HKV):
                kt, bt = kf[b, t, h], bf[b, t, h]
                transition = torch.exp(gf[b, t, h]) * (eye - bt * torch.outer(kt, kt))
                S[h] = transition @ S[h] + bt * torch.outer(kt, vf[b, t, h])
                for i in range(G):
                    o[b, t, h * G + i] = scale * (qf[b, t, h * G + i] @ S[h])
        finals.append(torch.stack(S))
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
