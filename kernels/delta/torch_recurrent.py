"""The gated delta rule token by token in PyTorch: the decode step (a few tokens against a
carried state).

S_t = exp(g_t) S_{t-1} + k_t u_t^T,  u_t = beta_t (v_t - exp(g_t) k_t^T S_{t-1}),  o_t = scale q_t S_t

(the delta rule's transition applied without forming the K x K matrix). For prefill and
training use `chunk_gated_delta_rule`.
"""
from __future__ import annotations

import torch


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over T tokens (cost: T small steps) against a carried state.

    Args:
        q: [B, T, H, K]; k: [B, T, HKV, K]; v: [B, T, HKV, V]; H % HKV == 0.
        beta: [B, T, HKV]; g: [B, T, HKV] log decay (<= 0).
        scale: multiplies the output (None: K ** -0.5).
        initial_state: [B, HKV, K, V] (None: zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [B, HKV, K, V] fp32 (fp64 for fp64 inputs)
        or None. Differentiable (plain PyTorch ops).
    """
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    scale = K ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = (initial_state.to(acc) if initial_state is not None
         else torch.zeros(B, HKV, K, V, dtype=acc, device=q.device))
    qa = q.to(acc).view(B, T, HKV, G, K)
    ka, va = k.to(acc), v.to(acc)
    decay, ba = g.to(acc).exp()[..., None, None], beta.to(acc)[..., None]
    outs = []
    for t in range(T):
        S = S * decay[:, t]
        kt = ka[:, t]  # [B, HKV, K]
        u = ba[:, t] * (va[:, t] - torch.matmul(kt.unsqueeze(-2), S).squeeze(-2))  # [B, HKV, V]
        S = torch.addcmul(S, kt.unsqueeze(-1), u.unsqueeze(-2))
        outs.append(torch.matmul(qa[:, t], S))  # [B, HKV, G, V]
    o = torch.stack(outs, dim=1) * scale
    return o.reshape(B, T, H, V).to(q.dtype), (S if output_final_state else None)
