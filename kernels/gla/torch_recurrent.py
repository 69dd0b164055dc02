"""Gated linear attention token by token in PyTorch: the CPU path for decoding a few tokens.

S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

Same math as the fp64 reference `naive_gla`, in the input's accumulation dtype and with as few
ops per token as the recurrence allows (one decay, one rank-1 update, one product per
group of query heads): a decode step runs it once per layer, so its op count is its cost.
For prefill and training use `chunk_gla`.
"""
from __future__ import annotations

import torch

from ..utils import check_gla_inputs


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over T tokens (a few: cost is T small ops) against a carried state.

    Args:
        q: [B, T, H, K] queries (already feature-mapped).
        k: [B, T, HKV, K] keys; H % HKV == 0, query head h reads KV head h // (H // HKV).
        v: [B, T, HKV, V] values.
        g: [B, T, HKV, K] per-channel or [B, T, HKV] per-head log decay, all <= 0.
        scale: multiplies the output.
        initial_state: [B, HKV, K, V] (None: zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o: [B, T, H, V] in the dtype of q; final_state: [B, HKV, K, V] in fp32 (fp64 for fp64
        inputs) or None. Differentiable (plain PyTorch ops).
    """
    check_gla_inputs(q, k, v, g, initial_state, None)
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = (initial_state.to(acc) if initial_state is not None
         else torch.zeros(B, HKV, K, V, dtype=acc, device=q.device))
    decay = g.to(acc).exp()
    decay = decay.unsqueeze(-1) if g.dim() == 4 else decay[..., None, None]  # [B, T, HKV, K or 1, 1]
    qa = q.to(acc).view(B, T, HKV, G, K)
    ka, va = k.to(acc).unsqueeze(-1), v.to(acc).unsqueeze(-2)  # [B, T, HKV, K, 1], [B, T, HKV, 1, V]
    outs = []
    for t in range(T):
        S = torch.addcmul(S * decay[:, t], ka[:, t], va[:, t])
        outs.append(torch.matmul(qa[:, t], S))  # [B, HKV, G, V]
    o = outs[0].unsqueeze(1) if T == 1 else torch.stack(outs, dim=1)
    if scale != 1.0:
        o = o * scale
    return o.reshape(B, T, H, V).to(q.dtype), (S if output_final_state else None)
