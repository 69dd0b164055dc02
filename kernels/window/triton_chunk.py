"""Sliding-window softmax attention with sink tokens and sink logits in Triton.

Same semantics as `naive_window_attention`: query t sees key s when s is valid, s <= t and
either t - s < window or s is one of the first `num_sink_tokens` valid keys of its
sequence; `sink_logits` enter the softmax denominator only. FlashAttention-style online
softmax, so no [T, T] score matrix exists: a block of queries visits only the key band
[t0 - window + 1, t0 + BM) plus the sink keys, which are gathered by position and counted
only where they lie outside the band (so nothing is counted twice).

Backward (FlashAttention-2 style, probabilities recomputed from the saved lse): one kernel
for dq (query blocks, same visiting order as the forward), one for dk/dv of every key
block over the queries whose band contains it (KV-head programs loop over their query
heads, so GQA needs no atomics), and one for dk/dv of the sink keys over all later
queries outside the band. Gradients reach sink_logits and also flow through lse.

Tiling helpers (dot rounding, autotune switch, sequence layout) come from the GLA module.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gla.triton_chunk import INTERPRET, SeqInfo, _dot, block, dot_dtype, tuned
from ..utils import check_softcap, check_window_inputs

BLOCK_M = 16 if INTERPRET else 64
BLOCK_N_BWD = 16 if INTERPRET else 32
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _cap(sc, cap2, CAP: tl.constexpr):
    # scores in log2 units; with CAP, cap2 * tanh(sc / cap2) (cap2 = softcap * log2(e))
    if CAP:
        sc = cap2 * (2. * tl.sigmoid(2. * sc / cap2) - 1.)
    return sc


@triton.jit
def _online_update(m_i, l_i, acc, sc, b_v, DOT: tl.constexpr):
    # sc: [BR, BN] scores in log2 units, -inf where masked
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    p = tl.exp2(sc - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p, b_v, DOT)
    return m_new, l_i, acc


@triton.jit
def window_rows(
    q, k, v, km, sp, sl, t0, bos, eos, i_n, i_h, i_hk, window, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    NS: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, BSL: tl.constexpr,
    HAS_KM: tl.constexpr, DOT: tl.constexpr, cap2, CAP: tl.constexpr,
):
    """Window attention for query rows [t0, t0 + BR) of the sequence [bos, eos).

    qk_scale is the score scale times log2(e); with CAP the scores are soft-capped at cap2
    (the cap times log2(e)). Returns (o [BR, BDV] fp32, lse [BR] fp32,
    natural log; -inf and o = 0 for a row that sees nothing).
    """
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    md, mdv = od < D, odv < DV
    t = t0 + tl.arange(0, BR)
    mt = t < eos
    b_q = tl.load(q + (t[:, None] * H + i_h) * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.)
    m_i = tl.full([BR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BR], dtype=tl.float32)
    acc = tl.zeros([BR, BDV], dtype=tl.float32)
    if NS > 0:
        oj = tl.arange(0, BS)
        b_sp = tl.load(sp + i_n * NS + oj, mask=oj < NS, other=-1).to(tl.int64)
        mj = b_sp >= 0
        b_ks = tl.load(k + (b_sp[:, None] * HKV + i_hk) * D + od[None, :], mask=mj[:, None] & md[None, :], other=0.)
        b_vs = tl.load(v + (b_sp[:, None] * HKV + i_hk) * DV + odv[None, :], mask=mj[:, None] & mdv[None, :],
                       other=0.)
        far = mj[None, :] & (b_sp[None, :] <= t[:, None]) & (t[:, None] - b_sp[None, :] >= window)
        sc_far = tl.where(far, _cap(_dot(b_q, tl.trans(b_ks), DOT) * qk_scale, cap2, CAP), float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, sc_far, b_vs, DOT)
    lo = tl.maximum(t0 - window + 1, bos)
    hi = tl.minimum(t0 + BR, eos)
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        ms = s < hi
        if HAS_KM:
            ms = ms & (tl.load(km + s, mask=ms, other=0) != 0)
        b_k = tl.load(k + (s[:, None] * HKV + i_hk) * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.)
        b_v = tl.load(v + (s[:, None] * HKV + i_hk) * DV + odv[None, :], mask=ms[:, None] & mdv[None, :], other=0.)
        near = ms[None, :] & (s[None, :] <= t[:, None]) & (t[:, None] - s[None, :] < window)
        sc = tl.where(near, _cap(_dot(b_q, tl.trans(b_k), DOT) * qk_scale, cap2, CAP), float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, sc, b_v, DOT)
    if M > 0:
        om = tl.arange(0, BSL)
        b_sl = tl.load(sl + i_h * M + om, mask=om < M, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(b_sl, axis=0))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(tl.exp2(b_sl[None, :] - m_new[:, None]), axis=1)
        acc = acc * alpha[:, None]
        m_i = m_new
    b_o = acc / tl.where(l_i > 0, l_i, 1.)[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.))) * 0.6931471805599453, float("-inf"))
    return b_o, lse


@tuned(key=["H", "HKV", "D", "DV", "BM", "NS", "M", "HAS_KM", "DOT", "CAP"])
@triton.jit
def _window_fwd_kernel(
    q, k, v, km, sp, sl, o, lse, cu, blocks, window, qk_scale, cap2,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    NS: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, BSL: tl.constexpr,
    HAS_KM: tl.constexpr, DOT: tl.constexpr, CAP: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HKV)
    i_n = tl.load(blocks + 2 * i_b)
    t0 = tl.load(cu + i_n).to(tl.int64) + tl.load(blocks + 2 * i_b + 1).to(tl.int64) * BM
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    b_o, b_lse = window_rows(q, k, v, km, sp, sl, t0, bos, eos, i_n, i_h, i_hk, window, qk_scale,
                             H, HKV, D, DV, BM, BM, BD, BDV, NS, BS, M, BSL, HAS_KM, DOT, cap2, CAP)
    t = t0 + tl.arange(0, BM)
    mt = t < eos
    odv = tl.arange(0, BDV)
    tl.store(o + (t[:, None] * H + i_h) * DV + odv[None, :], b_o.to(o.dtype.element_ty),
             mask=mt[:, None] & (odv < DV)[None, :])
    tl.store(lse + t * H + i_h, b_lse, mask=mt)


@triton.jit
def _ds_block(b_q, b_do, b_lse2, b_delta, b_k, b_v, allowed, qk_scale, DOT: tl.constexpr, cap2,
              CAP: tl.constexpr):
    # p and dS = p * (dP - delta) for one [BM, BN] tile (natural-log gradient of the scores
    # before the cap: times 1 - tanh^2 with CAP)
    sc = _cap(_dot(b_q, tl.trans(b_k), DOT) * qk_scale, cap2, CAP)
    p = tl.where(allowed, tl.exp2(sc - b_lse2[:, None]), 0.)
    dp = _dot(b_do, tl.trans(b_v), DOT)
    ds = p * (dp - b_delta[:, None])
    if CAP:
        th = sc / cap2
        ds = ds * (1. - th * th)
    return p, ds


@tuned(key=["H", "HKV", "D", "DV", "BM", "NS", "HAS_KM", "DOT", "CAP"])
@triton.jit
def _window_dq_kernel(
    q, k, v, km, sp, do, lse, delta, dq, cu, blocks, window, qk_scale, scale, cap2,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr,
    HAS_KM: tl.constexpr, DOT: tl.constexpr, CAP: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HKV)
    i_n = tl.load(blocks + 2 * i_b)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + tl.load(blocks + 2 * i_b + 1).to(tl.int64) * BM
    od, odv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = od < D, odv < DV
    t = t0 + tl.arange(0, BM)
    mt = t < eos
    b_q = tl.load(q + (t[:, None] * H + i_h) * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.)
    b_do = tl.load(do + (t[:, None] * H + i_h) * DV + odv[None, :], mask=mt[:, None] & mdv[None, :], other=0.)
    b_lse = tl.load(lse + t * H + i_h, mask=mt, other=0.)
    b_lse2 = tl.where(b_lse == float("-inf"), 0., b_lse * 1.4426950408889634)
    b_delta = tl.load(delta + t * H + i_h, mask=mt, other=0.)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    if NS > 0:
        oj = tl.arange(0, BS)
        b_sp = tl.load(sp + i_n * NS + oj, mask=oj < NS, other=-1).to(tl.int64)
        mj = b_sp >= 0
        b_ks = tl.load(k + (b_sp[:, None] * HKV + i_hk) * D + od[None, :], mask=mj[:, None] & md[None, :], other=0.)
        b_vs = tl.load(v + (b_sp[:, None] * HKV + i_hk) * DV + odv[None, :], mask=mj[:, None] & mdv[None, :],
                       other=0.)
        far = mj[None, :] & (b_sp[None, :] <= t[:, None]) & (t[:, None] - b_sp[None, :] >= window)
        p_far, ds_far = _ds_block(b_q, b_do, b_lse2, b_delta, b_ks, b_vs, far, qk_scale, DOT, cap2, CAP)
        b_dq += _dot(ds_far, b_ks, DOT)
    lo = tl.maximum(t0 - window + 1, bos)
    hi = tl.minimum(t0 + BM, eos)
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        ms = s < hi
        if HAS_KM:
            ms = ms & (tl.load(km + s, mask=ms, other=0) != 0)
        b_k = tl.load(k + (s[:, None] * HKV + i_hk) * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.)
        b_v = tl.load(v + (s[:, None] * HKV + i_hk) * DV + odv[None, :], mask=ms[:, None] & mdv[None, :], other=0.)
        near = ms[None, :] & (s[None, :] <= t[:, None]) & (t[:, None] - s[None, :] < window)
        _, ds = _ds_block(b_q, b_do, b_lse2, b_delta, b_k, b_v, near, qk_scale, DOT, cap2, CAP)
        b_dq += _dot(ds, b_k, DOT)
    tl.store(dq + (t[:, None] * H + i_h) * D + od[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


@tuned(key=["H", "HKV", "D", "DV", "BM", "HAS_KM", "DOT", "CAP"])
@triton.jit
def _window_dkv_kernel(
    q, k, v, km, do, lse, delta, dk, dv, cu, blocks, window, qk_scale, scale, cap2,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, HAS_KM: tl.constexpr,
    DOT: tl.constexpr, CAP: tl.constexpr,
):
    # dk, dv of one key block from the queries whose band (t - s < window) contains it
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    i_n = tl.load(blocks + 2 * i_b)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    s0 = bos + tl.load(blocks + 2 * i_b + 1).to(tl.int64) * BM
    od, odv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = od < D, odv < DV
    s = s0 + tl.arange(0, BM)
    ms = s < eos
    if HAS_KM:
        ms = ms & (tl.load(km + s, mask=ms, other=0) != 0)
    b_k = tl.load(k + (s[:, None] * HKV + i_hk) * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.)
    b_v = tl.load(v + (s[:, None] * HKV + i_hk) * DV + odv[None, :], mask=ms[:, None] & mdv[None, :], other=0.)
    b_dk = tl.zeros([BM, BD], dtype=tl.float32)
    b_dv = tl.zeros([BM, BDV], dtype=tl.float32)
    hi = tl.minimum(s0 + BM - 1 + window, eos)
    for i_g in range(0, G):
        i_h = i_hk * G + i_g
        for t0 in range(s0, hi, BN):
            t = t0 + tl.arange(0, BN)
            mt = t < hi
            b_q = tl.load(q + (t[:, None] * H + i_h) * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.)
            b_do = tl.load(do + (t[:, None] * H + i_h) * DV + odv[None, :], mask=mt[:, None] & mdv[None, :],
                           other=0.)
            b_lse = tl.load(lse + t * H + i_h, mask=mt, other=0.)
            b_lse2 = tl.where(b_lse == float("-inf"), 0., b_lse * 1.4426950408889634)
            b_delta = tl.load(delta + t * H + i_h, mask=mt, other=0.)
            near = ms[None, :] & mt[:, None] & (s[None, :] <= t[:, None]) & (t[:, None] - s[None, :] < window)
            p, ds = _ds_block(b_q, b_do, b_lse2, b_delta, b_k, b_v, near, qk_scale, DOT, cap2, CAP)
            b_dv += _dot(tl.trans(p), b_do, DOT)
            b_dk += _dot(tl.trans(ds), b_q, DOT)
    tl.store(dk + (s[:, None] * HKV + i_hk) * D + od[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=(s < eos)[:, None] & md[None, :])
    tl.store(dv + (s[:, None] * HKV + i_hk) * DV + odv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=(s < eos)[:, None] & mdv[None, :])


@tuned(key=["H", "HKV", "D", "DV", "BN", "NS", "DOT", "CAP"])
@triton.jit
def _window_sink_dkv_kernel(
    q, k, v, sp, do, lse, delta, dks, dvs, cu, window, qk_scale, scale, cap2,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr,
    DOT: tl.constexpr, CAP: tl.constexpr,
):
    # dk, dv of the sink keys from the queries that see them outside the band (t - s >= window)
    i_n, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    od, odv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = od < D, odv < DV
    oj = tl.arange(0, BS)
    b_sp = tl.load(sp + i_n * NS + oj, mask=oj < NS, other=-1).to(tl.int64)
    mj = b_sp >= 0
    b_k = tl.load(k + (b_sp[:, None] * HKV + i_hk) * D + od[None, :], mask=mj[:, None] & md[None, :], other=0.)
    b_v = tl.load(v + (b_sp[:, None] * HKV + i_hk) * DV + odv[None, :], mask=mj[:, None] & mdv[None, :], other=0.)
    b_dk = tl.zeros([BS, BD], dtype=tl.float32)
    b_dv = tl.zeros([BS, BDV], dtype=tl.float32)
    for i_g in range(0, G):
        i_h = i_hk * G + i_g
        for t0 in range(bos + window, eos, BN):
            t = t0 + tl.arange(0, BN)
            mt = t < eos
            b_q = tl.load(q + (t[:, None] * H + i_h) * D + od[None, :], mask=mt[:, None] & md[None, :], other=0.)
            b_do = tl.load(do + (t[:, None] * H + i_h) * DV + odv[None, :], mask=mt[:, None] & mdv[None, :],
                           other=0.)
            b_lse = tl.load(lse + t * H + i_h, mask=mt, other=0.)
            b_lse2 = tl.where(b_lse == float("-inf"), 0., b_lse * 1.4426950408889634)
            b_delta = tl.load(delta + t * H + i_h, mask=mt, other=0.)
            far = mj[None, :] & mt[:, None] & (t[:, None] - b_sp[None, :] >= window)
            p, ds = _ds_block(b_q, b_do, b_lse2, b_delta, b_k, b_v, far, qk_scale, DOT, cap2, CAP)
            b_dv += _dot(tl.trans(p), b_do, DOT)
            b_dk += _dot(tl.trans(ds), b_q, DOT)
    base = (i_n * HKV + i_hk) * BS + oj[:, None]
    tl.store(dks + base * BD + od[None, :], b_dk * scale)
    tl.store(dvs + base * BDV + odv[None, :], b_dv)


class WindowLayout:
    """Blocks, sink positions and masks of one call, shared by forward and backward."""

    def __init__(self, q, window, num_sink_tokens, key_mask, cu_seqlens, block_m):
        B, T = q.shape[:2]
        dev = q.device
        self.info = SeqInfo(B, T, cu_seqlens, block_m, dev)
        self.block_m = block_m
        self.window = int(window) if window is not None else self.info.max_len + 1
        self.num_sinks = int(num_sink_tokens) if window is not None else 0
        self.key_mask = key_mask.reshape(-1).to(torch.int8).contiguous() if key_mask is not None else None
        self.sink_pos = None
        NS = self.num_sinks
        if NS:
            if key_mask is None:
                cu = self.info.cu.long()
                j = torch.arange(NS, device=dev)
                pos = cu[:-1, None] + j[None, :]
                self.sink_pos = torch.where(j[None, :] < (cu[1:] - cu[:-1])[:, None], pos, -1).to(torch.int32)
            else:
                valid = key_mask.bool()
                rank = valid.long().cumsum(-1) - 1
                slot = torch.where(valid & (rank < NS), rank, NS)
                rows = torch.arange(B * T, device=dev).view(B, T)
                pos = torch.full((B, NS + 1), -1, dtype=torch.long, device=dev)
                pos.scatter_(1, slot, rows)
                self.sink_pos = pos[:, :NS].to(torch.int32).contiguous()


def _cap_args(softcap):
    """(cap2, CAP): the cap in log2 units and whether there is one."""
    return (float(softcap) * LOG2E, True) if softcap is not None else (1.0, False)


def _window_forward(q, k, v, sl, scale, lay: WindowLayout, out_dtype, softcap=None):
    TT, H, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    info = lay.info
    o = torch.empty(TT, H, DV, dtype=out_dtype, device=q.device)
    lse = torch.empty(TT, H, dtype=torch.float32, device=q.device)
    M = sl.shape[-1] if sl is not None else 0
    cap2, CAP = _cap_args(softcap)
    if info.num_chunks:
        _window_fwd_kernel[(info.num_chunks, H)](
            q, k, v, lay.key_mask if lay.key_mask is not None else o,
            lay.sink_pos if lay.sink_pos is not None else info.cu, sl if sl is not None else lse, o, lse,
            info.cu, info.chunks, lay.window, scale * LOG2E, cap2,
            H=H, HKV=HKV, D=D, DV=DV, BM=lay.block_m, BD=block(D), BDV=block(DV),
            NS=lay.num_sinks, BS=block(lay.num_sinks), M=M, BSL=triton.next_power_of_2(max(M, 1)),
            HAS_KM=lay.key_mask is not None, DOT=dot_dtype(q.dtype), CAP=CAP,
        )
    return o, lse


def _window_backward(q, k, v, o, lse, sl, do, dlse, scale, lay: WindowLayout, softcap=None):
    TT, H, D = q.shape
    cap2, CAP = _cap_args(softcap)
    HKV, DV = k.shape[1], v.shape[-1]
    info = lay.info
    DOT = dot_dtype(q.dtype)
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    km = lay.key_mask if lay.key_mask is not None else delta
    BD, BDV, BM = block(D), block(DV), lay.block_m
    if info.num_chunks:
        sp = lay.sink_pos if lay.sink_pos is not None else info.cu
        _window_dq_kernel[(info.num_chunks, H)](
            q, k, v, km, sp, do, lse, delta, dq, info.cu, info.chunks, lay.window, scale * LOG2E, scale, cap2,
            H=H, HKV=HKV, D=D, DV=DV, BM=BM, BN=BLOCK_N_BWD, BD=BD, BDV=BDV, NS=lay.num_sinks,
            BS=block(lay.num_sinks), HAS_KM=lay.key_mask is not None, DOT=DOT, CAP=CAP,
        )
        _window_dkv_kernel[(info.num_chunks, HKV)](
            q, k, v, km, do, lse, delta, dk, dv, info.cu, info.chunks, lay.window, scale * LOG2E, scale, cap2,
            H=H, HKV=HKV, D=D, DV=DV, BM=BM, BN=BLOCK_N_BWD, BD=BD, BDV=BDV, HAS_KM=lay.key_mask is not None,
            DOT=DOT, CAP=CAP,
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if lay.num_sinks and info.num_chunks:
        BS = block(lay.num_sinks)
        dks = torch.empty(info.N, HKV, BS, BD, dtype=torch.float32, device=q.device)
        dvs = torch.empty(info.N, HKV, BS, BDV, dtype=torch.float32, device=q.device)
        _window_sink_dkv_kernel[(info.N, HKV)](
            q, k, v, lay.sink_pos, do, lse, delta, dks, dvs, info.cu, lay.window, scale * LOG2E, scale, cap2,
            H=H, HKV=HKV, D=D, DV=DV, BN=BLOCK_N_BWD, BD=BD, BDV=BDV, NS=lay.num_sinks, BS=BS, DOT=DOT, CAP=CAP,
        )
        pos = lay.sink_pos.long()
        valid = pos >= 0
        rows = pos[valid]
        dk.index_add_(0, rows, dks[:, :, :lay.num_sinks, :D].transpose(1, 2)[valid].to(dk.dtype))
        dv.index_add_(0, rows, dvs[:, :, :lay.num_sinks, :DV].transpose(1, 2)[valid].to(dv.dtype))
    dsl = None
    if sl is not None:
        p = torch.exp(sl[None].float() - lse[..., None])
        dsl = -(p * delta[..., None]).sum(0)
    return dq, dk, dv, dsl


class TritonWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sl, scale, lay, out_dtype, softcap=None):
        o, lse = _window_forward(q, k, v, sl, scale, lay, out_dtype, softcap)
        ctx.save_for_backward(q, k, v, o, lse, sl)
        ctx.scale, ctx.lay, ctx.softcap = scale, lay, softcap
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sl = ctx.saved_tensors
        dq, dk, dv, dsl = _window_backward(q, k, v, o, lse, sl, do.contiguous(), dlse, ctx.scale, ctx.lay,
                                           ctx.softcap)
        if dsl is not None:
            dsl = dsl.to(sl.dtype)
        return dq, dk, dv, dsl, None, None, None, None


def triton_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window softmax attention (Triton), differentiable in q, k, v and sink_logits.

    Args:
        q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv]; H % HKV == 0; D, Dv <= 256.
        window: keys within the last `window` positions (query included); None = full causal.
        num_sink_tokens: the first valid keys of each sequence stay visible to every query.
        sink_logits: [H] or [H, M] logits that enter each row's softmax denominator only.
        scale: score scale, default D ** -0.5.
        key_mask: [B, T] bool, False marks padding (never attended, not a sink).
        cu_seqlens: [N + 1] packed sequence bounds (B == 1); attention never crosses them.
        softcap: c > 0 caps the scaled scores to c * tanh(s / c) before the softmax (Gemma-2),
            in the kernels (backward through tanh); None = no cap.

    Returns:
        o: [B, T, H, Dv] in q's dtype (zeros for a query that sees nothing);
        lse: [B, T, H] fp32 log of the full softmax denominator (-inf when empty). Gradients
        flow through both outputs.
    """
    return window_autograd(q, k, v, window=window, num_sink_tokens=num_sink_tokens, sink_logits=sink_logits,
                           scale=scale, key_mask=key_mask, cu_seqlens=cu_seqlens, out_dtype=q.dtype, softcap=softcap)


def window_autograd(q, k, v, *, window, num_sink_tokens, sink_logits, scale, key_mask, cu_seqlens, out_dtype,
                    softcap=None):
    """`triton_window_attention` with the output dtype chosen (fp32 keeps a 16-bit run's o unrounded)."""
    check_window_inputs(q, k, v, window, num_sink_tokens, sink_logits, key_mask, cu_seqlens)
    check_softcap(softcap)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dtype != q.dtype:
            raise TypeError(f"triton_window_attention needs q, k, v in one of fp32/bf16/fp16, got {name}.dtype={x.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    lay = WindowLayout(q, window, num_sink_tokens, key_mask, cu_seqlens, BLOCK_M)
    sl = sink_logits.reshape(H, -1).contiguous() if sink_logits is not None else None
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()
    o, lse = TritonWindowAttention.apply(flat(q), flat(k), flat(v), sl, scale, lay, out_dtype,
                                         None if softcap is None else float(softcap))
    return o.view(B, T, H, v.shape[-1]), lse.view(B, T, H)
