"""Fused intra-layer hybrid in Triton: window softmax and gated linear attention together.

Forward: the chunk-state kernel of `triton_chunk_gla` runs first (one launch that also
writes the in-chunk gate cumsum and, for mode="shared", the normalizer state z). Then
`_hybrid_fwd_kernel` computes, for every block of query rows in one launch, the window
branch (online softmax over the key band, sink keys, sink logits), the linear branch
(inter-chunk state term plus intra-chunk part, sub-chunked for per-channel gates), and
their combination in registers: neither branch's output nor the window's lse ever reaches
memory. The rows of a block are the chunk (per-head gate) or a 16-row sub-chunk
(per-channel gate).

Backward is not fused: it recomputes both branches with the separate differentiable
kernels (`triton_window_attention`, `triton_chunk_gla`, with fp32 outputs) and differentiates the combination
(`combine_hybrid`) with autograd. That costs one extra forward of each branch, and gives
gradients for every input, the sink logits, the per-head weights (w_win, w_lin or c) and
initial_state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla.triton_chunk import (CHUNK_SIZE, MAX_HEAD_DIM, SUB_CHUNK_SIZE, SeqInfo, _flatten, block,
                                chunk_gla_autograd, dot_dtype, gla_out_rows, gla_states, triton_chunk_gla, tuned)
from ..utils import check_gla_inputs, check_window_inputs
from ..window.triton_chunk import BLOCK_M, LOG2E, WindowLayout, triton_window_attention, window_autograd, window_rows
from .combine import check_hybrid_inputs, combine_hybrid, compose_hybrid, head_weights, mask_linear_inputs

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@tuned(key=["H", "HKV", "D", "K", "V", "BT", "NS", "M", "HAS_KM", "SCALAR_G", "SHARED", "DOT"])
@triton.jit
def _hybrid_fwd_kernel(
    qw, kw, v, ql, kl, gc, h, z, km, sp, sl, ww, wl, cc, o, cu, chunks, soff, window, qk_scale, scale_lin,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NS: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, BSL: tl.constexpr,
    HAS_KM: tl.constexpr, SCALAR_G: tl.constexpr, SHARED: tl.constexpr, DOT: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HKV)
    i_n = tl.load(chunks + 2 * i_c)
    c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    cs = bos + c * BT
    ok, ov = tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    b_h = tl.load(h + ((so + c) * HKV + i_hk) * K * V + ok[:, None] * V + ov[None, :],
                  mask=mk[:, None] & mv[None, :], other=0.).to(DOT)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if SHARED:
        b_z += tl.load(z + ((so + c) * HKV + i_hk) * K + ok, mask=mk, other=0.)
        b_c = tl.load(cc + i_h).to(tl.float32)
    else:
        b_ww = tl.load(ww + i_h).to(tl.float32)
        b_wl = tl.load(wl + i_h).to(tl.float32)
    BR: tl.constexpr = BT if SCALAR_G else BC
    for i in range(0, tl.cdiv(tl.minimum(eos - cs, BT), BR)):
        r0 = cs + i * BR
        b_ow, b_lse = window_rows(qw, kw, v, km, sp, sl, r0, bos, eos, i_n, i_h, i_hk, window, qk_scale,
                                  H, HKV, D, V, BR, BN, BD, BV, NS, BS, M, BSL, HAS_KM, DOT, 1.0, False)
        b_ol, b_den = gla_out_rows(ql, kl, v, gc, b_h, b_z, r0, cs, eos, i_h, i_hk, 0, scale_lin,
                                   H, HKV, K, V, BT, BR, BK, BV, SCALAR_G, SHARED, DOT)
        if SHARED:
            # (e^(lse-M) o_win + c num e^(-M)) / (e^(lse-M) + c den e^(-M)), M = max(lse, log(c den))
            cden = b_c * b_den
            has_lin = cden > 0
            m = tl.where(has_lin, tl.maximum(b_lse, tl.log(tl.where(has_lin, cden, 1.))), b_lse)
            m = tl.where(m == float("-inf"), 0., m)
            u = tl.exp(b_lse - m)
            e = tl.exp(-m)
            total = u + cden * e
            total = tl.where(total != 0, total, 1.)
            b_o = (u[:, None] * b_ow + (b_c * e)[:, None] * b_ol) / total[:, None]
        else:
            b_o = b_ww * b_ow + b_wl * b_ol
        t = r0 + tl.arange(0, BR)
        tl.store(o + (t[:, None] * H + i_h) * V + ov[None, :], b_o.to(o.dtype.element_ty),
                 mask=(t < eos)[:, None] & mv[None, :])


def _fused_forward(q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, *, mode, window, num_sink_tokens, scale_win,
                   scale_lin, key_mask, cu_seqlens, initial_state, output_final_state):
    B, T, H, D = q_win.shape
    HKV, K, V = k_win.shape[2], q_lin.shape[-1], v.shape[-1]
    shared = mode == "shared"
    dev = q_win.device
    info = SeqInfo(B, T, cu_seqlens, CHUNK_SIZE, dev)
    lay = WindowLayout(q_win, window, num_sink_tokens, key_mask, cu_seqlens, BLOCK_M)
    qw, kw, vf, ql, kl, gf = (_flatten(x) for x in (q_win, k_win, v, q_lin, k_lin, g))
    h0 = z0 = None
    if initial_state is not None:
        h0 = initial_state[..., :V].contiguous() if shared else initial_state
        z0 = initial_state[..., V].contiguous() if shared else None
    gc, h, ht, z, zt = gla_states(kl, vf, gf, h0, info, output_final_state=output_final_state,
                                  normalizer=shared, initial_z=z0)
    o = torch.empty(B * T, H, V, dtype=q_win.dtype, device=dev)
    M = sl.shape[-1] if sl is not None else 0
    if info.num_chunks:
        _hybrid_fwd_kernel[(info.num_chunks, H)](
            qw, kw, vf, ql, kl, gc, h, z if z is not None else h,
            lay.key_mask if lay.key_mask is not None else o, lay.sink_pos if lay.sink_pos is not None else info.cu,
            sl if sl is not None else h, ww, wl, cc, o, info.cu, info.chunks, info.state_offsets,
            lay.window, (D ** -0.5 if scale_win is None else scale_win) * LOG2E, scale_lin,
            H=H, HKV=HKV, D=D, K=K, V=V, BT=CHUNK_SIZE, BC=SUB_CHUNK_SIZE, BN=BLOCK_M,
            BD=block(D), BK=block(K), BV=block(V), NS=lay.num_sinks, BS=block(lay.num_sinks), M=M,
            BSL=triton.next_power_of_2(max(M, 1)), HAS_KM=lay.key_mask is not None, SCALAR_G=g.dim() == 3,
            SHARED=shared, DOT=dot_dtype(q_win.dtype),
        )
    if output_final_state and shared:
        ht = torch.cat([ht, zt[..., None]], dim=-1)
    return o.view(B, T, H, V), ht


def _composed(q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, initial_state, *, mode, window, num_sink_tokens,
              scale_win, scale_lin, key_mask, cu_seqlens, output_final_state):
    # both branches keep fp32 outputs, like the fused forward's registers
    o_win, lse = window_autograd(q_win, k_win, v, window=window, num_sink_tokens=num_sink_tokens, sink_logits=sl,
                                 scale=scale_win, key_mask=key_mask, cu_seqlens=cu_seqlens, out_dtype=torch.float32)
    v_lin = v if mode == "mix" else torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o_lin, ht = chunk_gla_autograd(q_lin, k_lin, v_lin, g, scale=scale_lin, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   out_dtype=torch.float32)
    o = combine_hybrid(o_win, lse, o_lin, mode=mode, w_win=ww, w_lin=wl, c=cc)
    return o.to(q_win.dtype), ht


class TritonHybridAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, initial_state, opts):
        o, ht = _fused_forward(q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, initial_state=initial_state, **opts)
        ctx.save_for_backward(q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, initial_state)
        ctx.opts = opts
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() if x is not None and need else None
                      for x, need in zip(inputs, ctx.needs_input_grad)]
            args = [leaf if leaf is not None else x for leaf, x in zip(leaves, inputs)]
            o, ht = _composed(*args, **ctx.opts)
            outs, grads = [o], [do]
            if ht is not None and dht is not None:
                outs.append(ht)
                grads.append(dht)
            wrt = [x for x in leaves if x is not None]
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if wrt else iter(())
        return tuple(next(got) if x is not None else None for x in leaves) + (None,)


def triton_hybrid_attention(
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
    """Window softmax + gated linear attention of one layer, fused forward (Triton).

    Same arguments and results as `naive_hybrid_attention`:
    q_win [B, T, H, D], k_win [B, T, HKV, D], v [B, T, HKV, V], q_lin [B, T, H, K],
    k_lin [B, T, HKV, K], g [B, T, HKV, K] or [B, T, HKV]; mode "mix" (w_win, w_lin: float
    or [H]) or "shared" (c: float or [H] >= 0); initial_state [N, HKV, K, V] (mix) or
    [N, HKV, K, V + 1] (shared). Returns o [B, T, H, V] in q_win's dtype and the fp32 final
    state or None. Differentiable in every tensor argument (backward by recomputation
    through the separate window and GLA kernels). With `softcap` (Gemma-2's capped window
    scores) the fused kernel is not used yet: `triton_window_attention` (capped) and
    `triton_chunk_gla` run one after the other and are combined as in `compose_hybrid`.
    """
    if softcap is not None:
        return compose_hybrid(triton_window_attention, triton_chunk_gla, q_win, k_win, v, q_lin, k_lin, g,
                              window=window, mode=mode, num_sink_tokens=num_sink_tokens, sink_logits=sink_logits,
                              scale_win=scale_win, scale_lin=scale_lin, w_win=w_win, w_lin=w_lin, c=c,
                              key_mask=key_mask, cu_seqlens=cu_seqlens, initial_state=initial_state,
                              output_final_state=output_final_state, softcap=softcap)
    check_hybrid_inputs(q_win, k_win, v, q_lin, k_lin, g, mode)
    check_window_inputs(q_win, k_win, v, window, num_sink_tokens, sink_logits, key_mask, cu_seqlens)
    v_lin = v if mode == "mix" else torch.empty(*v.shape[:-1], v.shape[-1] + 1, device="meta")
    check_gla_inputs(q_lin, k_lin, v_lin, g, initial_state, cu_seqlens)
    dtypes = {q_win.dtype, k_win.dtype, v.dtype, q_lin.dtype, k_lin.dtype}
    if len(dtypes) != 1 or q_win.dtype not in SUPPORTED or g.dtype not in SUPPORTED:
        raise TypeError(f"q_win, k_win, v, q_lin, k_lin must share one of fp32/bf16/fp16 (g too), got "
                        f"{sorted(map(str, dtypes))} and g {g.dtype}")
    if max(q_win.shape[-1], q_lin.shape[-1], v.shape[-1] + (mode == "shared")) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported")
    H = q_win.shape[2]
    ref = torch.empty(0, dtype=torch.float32, device=q_win.device)
    ww, wl, cc = (head_weights(w, H, d, ref).contiguous() for w, d in ((w_win, 0.5), (w_lin, 0.5), (c, 1.0)))
    sl = sink_logits.reshape(H, -1).contiguous() if sink_logits is not None else None
    k_lin, g = mask_linear_inputs(k_lin, g, key_mask)
    opts = dict(mode=mode, window=window, num_sink_tokens=num_sink_tokens,
                scale_win=None if scale_win is None else float(scale_win), scale_lin=float(scale_lin),
                key_mask=key_mask, cu_seqlens=cu_seqlens, output_final_state=output_final_state)
    return TritonHybridAttention.apply(q_win, k_win, v, q_lin, k_lin, g, sl, ww, wl, cc, initial_state, opts)
