"""Fused recurrent gated delta rule in Triton, for decoding a few tokens.

One program per (value block, sequence, KV head) keeps the fp32 state tile [K, BV] in
registers and steps through the tokens: S = exp(g_t) S, u = beta_t (v_t - k_t S),
S = S + k_t^T u, then every query head of the group reads o_t = scale q_t S. The update of a
value column needs only that column of the state, so value blocks run independently.
Forward only: inputs that require grad under grad mode are refused (use the chunked path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla.triton_chunk import MAX_BLOCK, MAX_HEAD_DIM, block
from ..utils import tracks_grad
from .torch_chunk import check_delta_inputs


@triton.jit
def _fused_recurrent_delta_kernel(
    q, k, v, beta, g, o, h0, ht, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hk = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = H // HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = (i_n * HKV + i_hk) * K * V + ok[:, None] * V + ov[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * HKV + i_hk) * K + ok, mask=mk, other=0.).to(tl.float32)
        b_v = tl.load(v + (t * HKV + i_hk) * V + ov, mask=mv, other=0.).to(tl.float32)
        b_beta = tl.load(beta + t * HKV + i_hk).to(tl.float32)
        b_h = b_h * tl.exp(tl.load(g + t * HKV + i_hk).to(tl.float32))
        b_u = b_beta * (b_v - tl.sum(b_k[:, None] * b_h, axis=0))
        b_h += b_k[:, None] * b_u[None, :]
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (t * H + i_h) * K + ok, mask=mk, other=0.).to(tl.float32) * scale
            b_o = tl.sum(b_q[:, None] * b_h, axis=0)
            tl.store(o + (t * H + i_h) * V + ov, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + p_kv, b_h, mask=m_kv)


def fused_recurrent_gated_delta_rule(
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
    """The gated delta rule token by token (Triton, forward only; for decoding).

    Args:
        q: [B, T, H, K]; k: [B, T, HKV, K]; v: [B, T, HKV, V]; H % HKV == 0; K, V <= 256.
        beta, g: [B, T, HKV] (g log decay <= 0). scale: None gives K ** -0.5.
        initial_state: [N, HKV, K, V] (N = B or the number of sequences); cu_seqlens: [N + 1]
        packed sequence bounds (B == 1).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] fp32 or None.
    """
    check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    if tracks_grad(q, k, v, beta, g, initial_state):
        raise RuntimeError("fused_recurrent_gated_delta_rule is forward only (decoding); call it under "
                           "torch.no_grad() or use chunk_gated_delta_rule for training")
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got K={K}, V={V}")
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, max(T, 1), dtype=torch.int32, device=q.device) if T else torch.zeros(
            B + 1, dtype=torch.int32, device=q.device)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    N = cu.numel() - 1
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, HKV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    BV = block(V, MAX_BLOCK)
    _fused_recurrent_delta_kernel[(triton.cdiv(V, BV), N * HKV)](
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), g.contiguous(), o,
        initial_state.contiguous() if initial_state is not None else o, ht if ht is not None else o,
        cu, float(scale), H=H, HKV=HKV, K=K, V=V, BK=block(K), BV=BV,
        USE_H0=initial_state is not None, STORE_HT=output_final_state,
    )
    return o, ht
