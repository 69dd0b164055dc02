"""Reference gated linear attention: a plain loop over time, exact in fp64.

S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

The state lives per key/value head; query head h reads the state of KV head
h // (H // HKV) (grouped-query attention without repeating k or v).
"""
from __future__ import annotations

import torch

from ..utils import check_gla_inputs, sequence_spans


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, one time step at a time.

    Args:
        q: [B, T, H, K] queries (already feature-mapped).
        k: [B, T, HKV, K] keys (already feature-mapped); H % HKV == 0.
        v: [B, T, HKV, V] values.
        g: [B, T, HKV, K] per-channel or [B, T, HKV] per-head log decay, all <= 0.
        scale: multiplies the output.
        initial_state: [N, HKV, K, V], N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N + 1] cumulative lengths of packed sequences (requires B == 1);
            the state restarts at every sequence start.

    Returns:
        o: [B, T, H, V] in the dtype of q; final_state: [N, HKV, K, V] (fp32, or fp64
        for fp64 inputs) or None.
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, gf = (x.to(acc) for x in (q, k, v, g))
    if gf.dim() == 3:
        gf = gf.unsqueeze(-1).expand(B, T, HKV, K)
    o = torch.zeros(B, T, HKV, G, V, dtype=acc, device=q.device)
    spans = sequence_spans(B, T, cu_seqlens)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            S = initial_state[n].to(acc).clone()
        else:
            S = torch.zeros(HKV, K, V, dtype=acc, device=q.device)
        for t in range(start, end):
            S = S * gf[b, t].exp().unsqueeze(-1) + kf[b, t].unsqueeze(-1) * vf[b, t].unsqueeze(-2)
            qt = qf[b, t].view(HKV, G, K)
            o[b, t] = scale * torch.einsum("hgk,hkv->hgv", qt, S)
        finals.append(S)
    o = o.reshape(B, T, H, V).to(q.dtype)
    final_state = torch.stack(finals) if output_final_state else None
    return o, final_state
