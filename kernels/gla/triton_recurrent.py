"""Fused recurrent gated linear attention in Triton, for decoding a few tokens.

One program per (value block, sequence, KV head) keeps the fp32 state tile in registers and
steps through the tokens one at a time: S = Diag(exp g_t) S + k_t^T v_t, then every query
head of the group reads o_t = scale q_t S. Cost is linear in T with no chunk overhead, which
is what decoding against a carried state needs; for prefill and training use
`triton_chunk_gla`.

Forward only: this kernel has no backward. It refuses inputs that require grad while grad
mode is on, instead of returning an output that silently detaches them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import check_gla_inputs, tracks_grad
from .triton_chunk import MAX_BLOCK, MAX_HEAD_DIM, block


@triton.jit
def _fused_recurrent_gla_kernel(
    q, k, v, g, o, h0, ht, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
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
        if SCALAR_G:
            b_h = b_h * tl.exp(tl.load(g + t * HKV + i_hk).to(tl.float32))
        else:
            b_g = tl.load(g + (t * HKV + i_hk) * K + ok, mask=mk, other=0.).to(tl.float32)
            b_h = b_h * tl.exp(b_g)[:, None]
        b_h += b_k[:, None] * b_v[None, :]
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (t * H + i_h) * K + ok, mask=mk, other=0.).to(tl.float32) * scale
            b_o = tl.sum(b_q[:, None] * b_h, axis=0)
            tl.store(o + (t * H + i_h) * V + ov, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + p_kv, b_h, mask=m_kv)


def fused_recurrent_gla(
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
    """Gated linear attention token by token (Triton, forward only; for decoding).

    Args:
        q: [B, T, H, K]; k: [B, T, HKV, K]; v: [B, T, HKV, V]; H % HKV == 0; K, V <= 256.
        g: [B, T, HKV, K] per-channel or [B, T, HKV] per-head log decay (<= 0).
        scale: multiplies the output.
        initial_state: [N, HKV, K, V], the carried state (N = B or the number of sequences).
        output_final_state: also return the fp32 state after the last token.
        cu_seqlens: [N + 1] packed sequence bounds (B == 1).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] fp32 or None.

    Raises RuntimeError when grad mode is on and an input requires grad: there is no backward.
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if tracks_grad(q, k, v, g, initial_state):
        raise RuntimeError("fused_recurrent_gla is forward only (decoding); call it under torch.no_grad() "
                           "or use triton_chunk_gla for training")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got K={q.shape[-1]}, V={v.shape[-1]}")
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device) if T else torch.zeros(
            B + 1, dtype=torch.int32, device=q.device)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    N = cu.numel() - 1
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, HKV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    BV = block(V, MAX_BLOCK)
    _fused_recurrent_gla_kernel[(triton.cdiv(V, BV), N * HKV)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), o,
        initial_state.contiguous() if initial_state is not None else o, ht if ht is not None else o,
        cu, float(scale),
        H=H, HKV=HKV, K=K, V=V, BK=block(K), BV=BV, SCALAR_G=g.dim() == 3,
        USE_H0=initial_state is not None, STORE_HT=output_final_state,
    )
    return o, ht
