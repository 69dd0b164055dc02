"""Chunked gated linear attention in Triton (the GPU path), forward and backward.

Same semantics as `naive_gla`: S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t,
with per-channel g [B, T, HKV, K] or per-head g [B, T, HKV] log decays (<= 0), grouped-query
heads (query head h reads KV head h // (H // HKV); k, v, g are never repeated), fp32
accumulation and fp32 state, packed sequences through `cu_seqlens`.

Algorithm, per sequence cut into chunks of BT rows (the last chunk may be shorter):
1. `_gla_states_kernel` walks the chunks of one sequence in order, carrying the fp32 state
   [K, V] and storing the state before every chunk (and after the last one); it also writes
   the in-chunk cumulative log decay gc. All exponents are measured from the chunk's last
   row, so they are <= 0.
2. `_gla_fwd_kernel` computes every chunk in parallel: the inter-chunk part
   (q * exp(gc)) @ S_chunk plus the intra-chunk causal part. A per-head gate makes the
   intra part one masked matmul. A per-channel gate does not factor that way without
   positive exponents, so the chunk is cut into sub-chunks of BC rows: a sub-chunk's queries
   meet all earlier keys of the chunk in one matmul, with decays measured from the
   sub-chunk's first row (both factors <= 0), and meet the keys of their own sub-chunk one
   key at a time.
3. Backward recomputes the states (nothing but the inputs is saved), runs the reverse
   recurrence for dS (`_gla_dh_kernel`), then dv (`_gla_dv_kernel`) and dq, dk, dg
   (`_gla_dqkg_kernel`) chunk-parallel. g_t scales exactly the (query a, key b) pairs with
   a >= t > b, so dg_t is summed over those pairs directly, grouped by where a and b lie
   (same sub-chunk, elsewhere in the chunk, before/after the chunk); the common shortcut,
   a reverse cumsum of q*dq - k*dk, subtracts pairs it added before and loses fp32
   precision under strong decay.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..utils import check_gla_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK_SIZE = 32 if INTERPRET else 64
SUB_CHUNK_SIZE = 16
MAX_BLOCK = 32 if INTERPRET else 64
DQKG_BLOCK_K = 32  # dq/dk/dg tiles hold full-V state tiles: narrower K keeps them in registers
MAX_HEAD_DIM = 256

if INTERPRET:
    # The interpreter multiplies the raw bits of 16-bit operands, so round them to the
    # kernel's dot dtype and multiply in fp32: the same rounding as on a GPU.
    @triton.jit
    def _dot(a, b, DOT: tl.constexpr):
        return tl.dot(a.to(DOT).to(tl.float32), b.to(DOT).to(tl.float32))

else:

    @triton.jit
    def _dot(a, b, DOT: tl.constexpr):
        if DOT == tl.float32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(DOT), b.to(DOT))


AUTOTUNE_ENV = "LINEARIZE_AUTOTUNE"


def tuned(key: list[str], warps=(4, 8), stages=(1, 2, 3)):
    """`triton.autotune` over num_warps/num_stages on a GPU; a fixed launch when interpreting.
    LINEARIZE_AUTOTUNE=0 (read at import) keeps one config (4 warps, 2 stages): each kernel
    compiles once instead of timing six, for quick checks where minutes of tuning do not pay."""
    if INTERPRET:
        return lambda fn: fn
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        configs = [triton.Config({}, num_warps=4, num_stages=2)]
    else:
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]
    return triton.autotune(configs=configs, key=key)


def dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot operands are rounded to: the input dtype (fp32 stays exact fp32)."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def block(n: int, cap: int | None = None) -> int:
    """Power-of-two tile covering n (at least 16, the smallest tl.dot side), capped at `cap`."""
    b = max(16, triton.next_power_of_2(n))
    return b if cap is None else min(b, cap)


class SeqInfo:
    """Where every sequence and chunk lives in the flattened [B * T] row axis.

    cu: [N + 1] int32 sequence bounds; chunks: [NT, 2] int32 (sequence, chunk in sequence);
    state_offsets: [N] int32 index of each sequence's first stored state (NT_n + 1 states
    per sequence: before every chunk and after the last).
    """

    def __init__(self, B: int, T: int, cu_seqlens: torch.LongTensor | None, chunk: int, device):
        if cu_seqlens is None:
            bounds = [b * T for b in range(B + 1)]
        else:
            bounds = [int(x) for x in cu_seqlens.tolist()]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        n_chunks = [triton.cdiv(L, chunk) for L in lengths]
        pairs, offsets, total = [], [], 0
        for n, nt in enumerate(n_chunks):
            pairs.extend((n, c) for c in range(nt))
            offsets.append(total)
            total += nt + 1
        self.N = len(lengths)
        self.chunk = chunk
        self.max_len = max(lengths) if lengths else 0
        self.num_chunks = len(pairs)
        self.num_states = total
        self.lengths = lengths
        self.cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        self.chunks = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device)
        self.state_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.last_rows = torch.tensor([b - 1 for b in bounds[1:]], dtype=torch.long, device=device)


@triton.jit
def _gla_states_kernel(
    k, v, g, gc, h, h0, ht, z, z0, zt, cu, soff,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_GC: tl.constexpr,
    NORM: tl.constexpr, DOT: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hk = i_nh // HKV, i_nh % HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ok[:, None] * V + ov[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (i_n * HKV + i_hk) * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
        if NORM:
            b_z += tl.load(z0 + (i_n * HKV + i_hk) * K + ok, mask=mk, other=0.).to(tl.float32)
    for c in range(0, NT):
        tl.store(h + ((so + c) * HKV + i_hk) * K * V + p_kv, b_h, mask=m_kv)
        if NORM:
            if i_v == 0:
                tl.store(z + ((so + c) * HKV + i_hk) * K + ok, b_z, mask=mk)
        rows = bos + c * BT + tl.arange(0, BT)
        mr = rows < eos
        last = tl.minimum(bos + c * BT + BT, eos) - 1
        b_k = tl.load(k + (rows[:, None] * HKV + i_hk) * K + ok[None, :], mask=mr[:, None] & mk[None, :],
                      other=0.)
        b_v = tl.load(v + (rows[:, None] * HKV + i_hk) * V + ov[None, :], mask=mr[:, None] & mv[None, :],
                      other=0.)
        if SCALAR_G:
            b_g = tl.load(g + rows * HKV + i_hk, mask=mr, other=0.).to(tl.float32)
            b_gc = tl.cumsum(b_g, axis=0)
            if STORE_GC:
                if (i_k == 0) & (i_v == 0):
                    tl.store(gc + rows * HKV + i_hk, b_gc, mask=mr)
            b_gl = tl.sum(tl.where(rows == last, b_gc, 0.), axis=0)
            b_kd = b_k * tl.exp(b_gl - b_gc)[:, None]
            b_h = b_h * tl.exp(b_gl) + _dot(tl.trans(b_kd), b_v, DOT)
            if NORM:
                b_z = b_z * tl.exp(b_gl) + tl.sum(b_kd, axis=0)
        else:
            m_rk = mr[:, None] & mk[None, :]
            b_g = tl.load(g + (rows[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_rk, other=0.).to(tl.float32)
            b_gc = tl.cumsum(b_g, axis=0)
            if STORE_GC:
                if i_v == 0:
                    tl.store(gc + (rows[:, None] * HKV + i_hk) * K + ok[None, :], b_gc, mask=m_rk)
            b_gl = tl.sum(tl.where((rows == last)[:, None], b_gc, 0.), axis=0)
            b_kd = b_k * tl.exp(b_gl[None, :] - b_gc)
            b_h = b_h * tl.exp(b_gl)[:, None] + _dot(tl.trans(b_kd), b_v, DOT)
            if NORM:
                b_z = b_z * tl.exp(b_gl) + tl.sum(b_kd, axis=0)
    tl.store(h + ((so + NT) * HKV + i_hk) * K * V + p_kv, b_h, mask=m_kv)
    if STORE_HT:
        tl.store(ht + (i_n * HKV + i_hk) * K * V + p_kv, b_h, mask=m_kv)
    if NORM:
        if i_v == 0:
            tl.store(z + ((so + NT) * HKV + i_hk) * K + ok, b_z, mask=mk)
            if STORE_HT:
                tl.store(zt + (i_n * HKV + i_hk) * K + ok, b_z, mask=mk)


@triton.jit
def gla_out_rows(
    q, k, v, gc, b_h, b_z, r0, cs, eos, i_h, i_hk, i_v, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, NORM: tl.constexpr, DOT: tl.constexpr,
):
    """Output rows [r0, r0 + BR) of the chunk starting at row cs (fp32 [BR, BV]).

    b_h: [BK, BV] state before the chunk (fp32); b_z: [BK] normalizer state (NORM only).
    Returns (o, den): den is scale * q_t z_t when NORM, zeros otherwise. With a per-channel
    gate BR is the sub-chunk size and r0 a sub-chunk start; with a per-head gate any BR works.
    """
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    t = r0 + tl.arange(0, BR)
    mt = t < eos
    s = cs + tl.arange(0, BT)
    b_q = tl.load(q + (t[:, None] * H + i_h) * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                  other=0.).to(tl.float32) * scale
    b_den = tl.zeros([BR], dtype=tl.float32)
    if SCALAR_G:
        ms = s < eos
        b_gt = tl.load(gc + t * HKV + i_hk, mask=mt, other=0.)
        b_gs = tl.load(gc + s * HKV + i_hk, mask=ms, other=0.)
        b_k = tl.load(k + (s[:, None] * HKV + i_hk) * K + ok[None, :], mask=ms[:, None] & mk[None, :], other=0.)
        b_v = tl.load(v + (s[:, None] * HKV + i_hk) * V + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.)
        b_qi = b_q * tl.exp(b_gt)[:, None]
        b_o = _dot(b_qi, b_h, DOT)
        causal = (s[None, :] <= t[:, None]) & ms[None, :] & mt[:, None]
        b_a = _dot(b_q, tl.trans(b_k), DOT) * tl.exp(tl.where(causal, b_gt[:, None] - b_gs[None, :], float("-inf")))
        b_o += _dot(b_a, b_v, DOT)
        if NORM:
            b_den += tl.sum(b_qi * b_z[None, :], axis=1) + tl.sum(b_a, axis=1)
    else:
        ms = s < r0
        m_tk = mt[:, None] & mk[None, :]
        b_gt = tl.load(gc + (t[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_tk, other=0.)
        b_gn = tl.load(gc + (r0 * HKV + i_hk) * K + ok, mask=mk, other=0.)
        b_qi = b_q * tl.exp(b_gt)
        b_o = _dot(b_qi, b_h, DOT)
        m_sk = ms[:, None] & mk[None, :]
        b_k = tl.load(k + (s[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_sk, other=0.)
        b_gs = tl.load(gc + (s[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_sk, other=0.)
        b_v = tl.load(v + (s[:, None] * HKV + i_hk) * V + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.)
        b_kg = b_k * tl.exp(tl.where(ms[:, None], b_gn[None, :] - b_gs, float("-inf")))
        b_qg = b_q * tl.exp(tl.where(mt[:, None], b_gt - b_gn[None, :], float("-inf")))
        b_a = _dot(b_qg, tl.trans(b_kg), DOT)
        b_o += _dot(b_a, b_v, DOT)
        if NORM:
            b_den += tl.sum(b_qi * b_z[None, :], axis=1) + tl.sum(b_a, axis=1)
        for j in range(0, BR):
            r = r0 + j
            mr = r < eos
            b_kr = tl.load(k + (r * HKV + i_hk) * K + ok, mask=ok < tl.where(mr, K, 0), other=0.).to(tl.float32)
            b_gr = tl.load(gc + (r * HKV + i_hk) * K + ok, mask=ok < tl.where(mr, K, 0), other=0.)
            b_vr = tl.load(v + (r * HKV + i_hk) * V + ov, mask=ov < tl.where(mr, V, 0), other=0.).to(tl.float32)
            m = (t >= r) & mt
            b_ar = tl.sum(b_q * b_kr[None, :] * tl.exp(tl.where(m[:, None], b_gt - b_gr[None, :], float("-inf"))),
                          axis=1)
            b_o += b_ar[:, None] * b_vr[None, :]
            if NORM:
                b_den += b_ar
    return b_o, b_den


@tuned(key=["H", "HKV", "K", "V", "BT", "SCALAR_G", "DOT"])
@triton.jit
def _gla_fwd_kernel(
    q, k, v, gc, h, o, cu, chunks, soff, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, DOT: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HKV)
    i_n = tl.load(chunks + 2 * i_c)
    c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    cs = bos + c * BT
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    b_h = tl.load(h + ((so + c) * HKV + i_hk) * K * V + ok[:, None] * V + ov[None, :],
                  mask=mk[:, None] & mv[None, :], other=0.).to(DOT)
    if SCALAR_G:
        b_o, _ = gla_out_rows(q, k, v, gc, b_h, b_h, cs, cs, eos, i_h, i_hk, i_v, scale,
                              H, HKV, K, V, BT, BT, BK, BV, SCALAR_G, False, DOT)
        t = cs + tl.arange(0, BT)
        tl.store(o + (t[:, None] * H + i_h) * V + ov[None, :], b_o.to(o.dtype.element_ty),
                 mask=(t < eos)[:, None] & mv[None, :])
    else:
        for i in range(0, tl.cdiv(tl.minimum(eos - cs, BT), BC)):
            r0 = cs + i * BC
            b_o, _ = gla_out_rows(q, k, v, gc, b_h, b_h, r0, cs, eos, i_h, i_hk, i_v, scale,
                                  H, HKV, K, V, BT, BC, BK, BV, SCALAR_G, False, DOT)
            t = r0 + tl.arange(0, BC)
            tl.store(o + (t[:, None] * H + i_h) * V + ov[None, :], b_o.to(o.dtype.element_ty),
                     mask=(t < eos)[:, None] & mv[None, :])


@tuned(key=["H", "HKV", "K", "V", "BT", "SCALAR_G", "DOT"])
@triton.jit
def _gla_dh_kernel(
    q, do, gc, dh, dht, cu, soff, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, USE_DHT: tl.constexpr, DOT: tl.constexpr,
):
    # dS_before(c) = exp(gL_c) * dS_before(c + 1) + scale * sum_heads (q * exp(gc))^T do
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hk = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = H // HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ok[:, None] * V + ov[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + (i_n * HKV + i_hk) * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for ci in range(0, NT):
        c = NT - 1 - ci
        tl.store(dh + ((so + c + 1) * HKV + i_hk) * K * V + p_kv, b_dh, mask=m_kv)
        rows = bos + c * BT + tl.arange(0, BT)
        mr = rows < eos
        last = tl.minimum(bos + c * BT + BT, eos) - 1
        m_rk = mr[:, None] & mk[None, :]
        if SCALAR_G:
            b_gc = tl.load(gc + rows * HKV + i_hk, mask=mr, other=0.)
            b_gl = tl.sum(tl.where(rows == last, b_gc, 0.), axis=0)
            b_dec = tl.exp(b_gc)[:, None]
            b_dh = b_dh * tl.exp(b_gl)
        else:
            b_gc = tl.load(gc + (rows[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_rk, other=0.)
            b_gl = tl.sum(tl.where((rows == last)[:, None], b_gc, 0.), axis=0)
            b_dec = tl.exp(b_gc)
            b_dh = b_dh * tl.exp(b_gl)[:, None]
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (rows[:, None] * H + i_h) * K + ok[None, :], mask=m_rk, other=0.)
            b_do = tl.load(do + (rows[:, None] * H + i_h) * V + ov[None, :], mask=mr[:, None] & mv[None, :],
                           other=0.)
            b_dh += _dot(tl.trans(b_q * b_dec * scale), b_do, DOT)
    tl.store(dh + (so * HKV + i_hk) * K * V + p_kv, b_dh, mask=m_kv)


@tuned(key=["H", "HKV", "K", "V", "BT", "SCALAR_G", "DOT"])
@triton.jit
def _gla_dv_kernel(
    q, k, do, gc, dh, dv, cu, chunks, soff, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, DOT: tl.constexpr,
):
    # dv_r = sum_heads sum_{t >= r} A_tr do_t + (k_r * exp(gL - gc_r)) dS_end
    i_v, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // HKV
    i_n = tl.load(chunks + 2 * i_c)
    c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    cs = bos + c * BT
    last = tl.minimum(cs + BT, eos) - 1
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    b_dh = tl.load(dh + ((so + c + 1) * HKV + i_hk) * K * V + ok[:, None] * V + ov[None, :],
                   mask=mk[:, None] & mv[None, :], other=0.).to(DOT)
    tq = cs + tl.arange(0, BT)
    mq = tq < eos
    if SCALAR_G:
        b_k = tl.load(k + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=mq[:, None] & mk[None, :], other=0.)
        b_gc = tl.load(gc + tq * HKV + i_hk, mask=mq, other=0.)
        b_gl = tl.load(gc + last * HKV + i_hk)
        b_dv = _dot(b_k.to(tl.float32) * tl.exp(b_gl - b_gc)[:, None], b_dh, DOT)
        causal = (tq[:, None] <= tq[None, :]) & mq[:, None] & mq[None, :]
        b_dec = tl.exp(tl.where(causal, b_gc[None, :] - b_gc[:, None], float("-inf")))
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (tq[:, None] * H + i_h) * K + ok[None, :], mask=mq[:, None] & mk[None, :], other=0.)
            b_do = tl.load(do + (tq[:, None] * H + i_h) * V + ov[None, :], mask=mq[:, None] & mv[None, :],
                           other=0.)
            b_at = _dot(b_k, tl.trans(b_q.to(tl.float32) * scale), DOT) * b_dec
            b_dv += _dot(b_at, b_do, DOT)
        tl.store(dv + (tq[:, None] * HKV + i_hk) * V + ov[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=mq[:, None] & mv[None, :])
    else:
        b_gl = tl.load(gc + (last * HKV + i_hk) * K + ok, mask=mk, other=0.)
        for j in range(0, tl.cdiv(last + 1 - cs, BC)):
            r0 = cs + j * BC
            rj = r0 + tl.arange(0, BC)
            mj = rj < eos
            m_jk = mj[:, None] & mk[None, :]
            b_k = tl.load(k + (rj[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_jk, other=0.).to(tl.float32)
            b_gj = tl.load(gc + (rj[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_jk, other=0.)
            b_gm = tl.load(gc + (tl.minimum(r0 + BC - 1, last) * HKV + i_hk) * K + ok, mask=mk, other=0.)
            b_dv = _dot(b_k * tl.exp(b_gl[None, :] - b_gj), b_dh, DOT)
            b_kg = b_k * tl.exp(b_gm[None, :] - b_gj)
            ma = (tq > r0 + BC - 1) & mq
            m_ak = ma[:, None] & mk[None, :]
            b_ga = tl.load(gc + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_ak, other=0.)
            b_dga = tl.exp(tl.where(ma[:, None], b_ga - b_gm[None, :], float("-inf")))
            for i_g in range(0, G):
                i_h = i_hk * G + i_g
                b_qa = tl.load(q + (tq[:, None] * H + i_h) * K + ok[None, :], mask=m_ak, other=0.)
                b_doa = tl.load(do + (tq[:, None] * H + i_h) * V + ov[None, :], mask=ma[:, None] & mv[None, :],
                                other=0.)
                b_at = _dot(b_kg, tl.trans(b_qa * (b_dga * scale)), DOT)
                b_dv += _dot(b_at, b_doa, DOT)
                for tt in range(0, BC):
                    t = r0 + tt
                    mt = t < eos
                    b_qt = tl.load(q + (t * H + i_h) * K + ok, mask=ok < tl.where(mt, K, 0), other=0.).to(tl.float32) * scale
                    b_gt = tl.load(gc + (t * HKV + i_hk) * K + ok, mask=ok < tl.where(mt, K, 0), other=0.)
                    b_dot = tl.load(do + (t * H + i_h) * V + ov, mask=ov < tl.where(mt, V, 0), other=0.).to(tl.float32)
                    m = rj <= tl.where(mt, t, -1)
                    b_at_t = tl.sum(b_k * b_qt[None, :] * tl.exp(tl.where(m[:, None], b_gt[None, :] - b_gj,
                                                                         float("-inf"))), axis=1)
                    b_dv += b_at_t[:, None] * b_dot[None, :]
            tl.store(dv + (rj[:, None] * HKV + i_hk) * V + ov[None, :], b_dv.to(dv.dtype.element_ty),
                     mask=mj[:, None] & mv[None, :])


@triton.jit
def _excl_cumsum(x, BR: tl.constexpr):
    # exclusive prefix sum over rows, exact in fp32 (no inclusive-minus-own cancellation)
    o = tl.arange(0, BR)
    tri = tl.where(o[None, :] < o[:, None], 1., 0.)
    return tl.dot(tri, x, input_precision="ieee")


@tuned(key=["H", "HKV", "K", "V", "BT", "SCALAR_G", "DOT"])
@triton.jit
def _gla_dqkg_kernel(
    q, k, v, do, gc, h, dh, dgk, dq, dk, dg, cu, chunks, soff, scale, NTOT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr, DOT: tl.constexpr,
):
    # dq_t = scale * [(do_t S_c^T) * exp(gc_t) + sum_{r <= t} (do_t . v_r) k_r exp(gc_t - gc_r)]
    # dk_r = (v_r dS_end^T) * exp(gL - gc_r) + scale * sum_{t >= r} (do_t . v_r) q_t exp(gc_t - gc_r)
    # g_t scales every (query a, key b) pair with a >= t > b, so dg_t is the sum of the pair terms
    # X_ab = scale (do_a . v_b) q_a k_b exp(G_a - G_b) over exactly those pairs. It is summed by
    # where a and b lie (this sub-chunk, earlier/later in the chunk, before/after the chunk), so
    # no pair is added and later subtracted: the usual reverse cumsum of q*dq - k*dk cancels the
    # pairs with a, b >= t, which dwarf the rest under strong decay.
    i_k, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = H // HKV
    i_n = tl.load(chunks + 2 * i_c)
    c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    so = tl.load(soff + i_n).to(tl.int64)
    cs = bos + c * BT
    last = tl.minimum(cs + BT, eos) - 1
    ok = i_k * BK + tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ok[:, None] * V + ov[None, :]
    b_h = tl.load(h + ((so + c) * HKV + i_hk) * K * V + p_kv, mask=m_kv, other=0.).to(DOT)
    b_dhn = tl.load(dh + ((so + c + 1) * HKV + i_hk) * K * V + p_kv, mask=m_kv, other=0.).to(DOT)
    # pairs with the query after the chunk and the key before it
    b_outer = tl.load(dgk + ((so + c) * HKV + i_hk) * K + ok, mask=mk, other=0.)
    tq = cs + tl.arange(0, BT)
    mq = tq < eos
    m_qk = mq[:, None] & mk[None, :]
    m_qv = mq[:, None] & mv[None, :]
    if SCALAR_G:
        b_k = tl.load(k + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_qk, other=0.)
        b_v = tl.load(v + (tq[:, None] * HKV + i_hk) * V + ov[None, :], mask=m_qv, other=0.)
        b_gc = tl.load(gc + tq * HKV + i_hk, mask=mq, other=0.)
        b_gl = tl.load(gc + last * HKV + i_hk)
        b_dki = _dot(b_v, tl.trans(b_dhn), DOT) * tl.exp(b_gl - b_gc)[:, None]
        b_dk = b_dki
        b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
        strict = (tq[None, :] < tq[:, None]) & mq[:, None] & mq[None, :]
        b_dec = tl.exp(tl.where(strict, b_gc[:, None] - b_gc[None, :], float("-inf")))
        b_pairs = tl.zeros([BT, BT], dtype=tl.float32)
        b_qin = tl.zeros([BT], dtype=tl.float32)
        b_vf = b_v.to(tl.float32)
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (tq[:, None] * H + i_h) * K + ok[None, :], mask=m_qk, other=0.)
            b_do = tl.load(do + (tq[:, None] * H + i_h) * V + ov[None, :], mask=m_qv, other=0.)
            b_dd = tl.sum(b_do.to(tl.float32) * b_vf, axis=1) * scale
            b_da = _dot(b_do, tl.trans(b_v), DOT) * scale * b_dec
            b_dqi = _dot(b_do, tl.trans(b_h), DOT) * (scale * tl.exp(b_gc))[:, None]
            b_dq = b_dqi + _dot(b_da, b_k, DOT) + b_dd[:, None] * b_k
            b_dk += _dot(tl.trans(b_da), b_q, DOT)
            b_dkd += b_dd[:, None] * b_q
            tl.store(dq + (tq[:, None] * H + i_h) * K + ok[None, :], b_dq.to(dq.dtype.element_ty), mask=m_qk)
            b_qin += tl.sum(b_q * b_dqi, axis=1)
            b_pairs += b_da * _dot(b_q, tl.trans(b_k), DOT)
        tl.store(dk + (tq[:, None] * HKV + i_hk) * K + ok[None, :], (b_dk + b_dkd).to(dk.dtype.element_ty), mask=m_qk)
        # rows a >= t of column b < t, pairs inside the chunk
        b_rect = tl.sum(tl.where(tq[None, :] < tq[:, None], tl.cumsum(b_pairs, axis=0, reverse=True), 0.), axis=1)
        b_kin = tl.sum(b_k * b_dki, axis=1)
        b_kin = tl.sum(tl.where(tq[None, :] < tq[:, None], b_kin[None, :], 0.), axis=1)
        b_dg = b_rect + tl.cumsum(b_qin, axis=0, reverse=True) + b_kin + tl.exp(b_gl) * tl.sum(b_outer, axis=0)
        tl.store(dg + (i_k * NTOT + tq) * HKV + i_hk, b_dg, mask=mq)
    else:
        b_gl = tl.load(gc + (last * HKV + i_hk) * K + ok, mask=mk, other=0.)
        b_outer = b_outer * tl.exp(b_gl)
        # per key row of the chunk: k*dk from the queries after the chunk
        b_kc = tl.load(k + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_qk, other=0.)
        b_vc = tl.load(v + (tq[:, None] * HKV + i_hk) * V + ov[None, :], mask=m_qv, other=0.)
        b_gcc = tl.load(gc + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_qk, other=0.)
        b_kout = b_kc * _dot(b_vc, tl.trans(b_dhn), DOT) * tl.exp(b_gl[None, :] - b_gcc)
        # q*dq from the keys before the chunk, summed over the sub-chunks after the current one
        b_qlater = tl.zeros([BK], dtype=tl.float32)
        NC = tl.cdiv(last + 1 - cs, BC)
        for jj in range(0, NC):
            j = NC - 1 - jj
            r0 = cs + j * BC
            rj = r0 + tl.arange(0, BC)
            mj = rj < eos
            m_jk = mj[:, None] & mk[None, :]
            b_kj = tl.load(k + (rj[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_jk, other=0.).to(tl.float32)
            b_vj = tl.load(v + (rj[:, None] * HKV + i_hk) * V + ov[None, :], mask=mj[:, None] & mv[None, :],
                           other=0.)
            b_gj = tl.load(gc + (rj[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_jk, other=0.)
            b_gn = tl.load(gc + (r0 * HKV + i_hk) * K + ok, mask=mk, other=0.)
            b_gm = tl.load(gc + (tl.minimum(r0 + BC - 1, last) * HKV + i_hk) * K + ok, mask=mk, other=0.)
            # keys of the chunk before this sub-chunk (for dq), decays measured from row r0
            mb = tq < r0
            m_bk = mb[:, None] & mk[None, :]
            b_kb = tl.load(k + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_bk, other=0.)
            b_gb = tl.load(gc + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_bk, other=0.)
            b_vb = tl.load(v + (tq[:, None] * HKV + i_hk) * V + ov[None, :], mask=mb[:, None] & mv[None, :],
                           other=0.)
            b_kgb = b_kb * tl.exp(tl.where(mb[:, None], b_gn[None, :] - b_gb, float("-inf")))
            b_dqg = tl.exp(tl.where(mj[:, None], b_gj - b_gn[None, :], float("-inf")))
            # queries of the chunk after this sub-chunk (for dk), decays measured from its last row
            ma = (tq > r0 + BC - 1) & mq
            m_ak = ma[:, None] & mk[None, :]
            b_ga = tl.load(gc + (tq[:, None] * HKV + i_hk) * K + ok[None, :], mask=m_ak, other=0.)
            b_dga = tl.exp(tl.where(ma[:, None], b_ga - b_gm[None, :], float("-inf")))
            b_dgn = tl.exp(tl.where(ma[:, None], b_ga - b_gn[None, :], float("-inf")))
            b_dki = _dot(b_vj, tl.trans(b_dhn), DOT) * tl.exp(b_gl[None, :] - b_gj)
            b_dko = tl.zeros([BC, BK], dtype=tl.float32)
            b_dkd = tl.zeros([BC, BK], dtype=tl.float32)
            b_dkdd = tl.zeros([BC, BK], dtype=tl.float32)
            b_qbefore = tl.zeros([BC, BK], dtype=tl.float32)
            b_qinj = tl.zeros([BK], dtype=tl.float32)
            b_diag = tl.zeros([BC, BK], dtype=tl.float32)
            b_span = tl.zeros([BK], dtype=tl.float32)
            b_vjf = b_vj.to(tl.float32)
            for i_g in range(0, G):
                i_h = i_hk * G + i_g
                b_qj = tl.load(q + (rj[:, None] * H + i_h) * K + ok[None, :], mask=m_jk, other=0.).to(tl.float32)
                b_doj = tl.load(do + (rj[:, None] * H + i_h) * V + ov[None, :], mask=mj[:, None] & mv[None, :],
                                other=0.)
                b_dqi = _dot(b_doj, tl.trans(b_h), DOT) * tl.exp(b_gj)
                b_dqo = _dot(_dot(b_doj, tl.trans(b_vb), DOT), b_kgb, DOT) * b_dqg
                b_dojf = b_doj.to(tl.float32)
                b_dd = tl.sum(b_dojf * b_vjf, axis=1)
                b_dqd = tl.zeros([BC, BK], dtype=tl.float32)
                for rr in range(0, BC):
                    r = r0 + rr
                    mr = r < eos
                    b_kr = tl.load(k + (r * HKV + i_hk) * K + ok, mask=ok < tl.where(mr, K, 0), other=0.).to(tl.float32)
                    b_gr = tl.load(gc + (r * HKV + i_hk) * K + ok, mask=ok < tl.where(mr, K, 0), other=0.)
                    b_vr = tl.load(v + (r * HKV + i_hk) * V + ov, mask=ov < tl.where(mr, V, 0), other=0.).to(tl.float32)
                    b_dar = tl.sum(b_dojf * b_vr[None, :], axis=1)
                    m = (rj > r) & mj
                    b_col = b_dar[:, None] * b_kr[None, :] * tl.exp(
                        tl.where(m[:, None], b_gj - b_gr[None, :], float("-inf")))
                    b_dqd += b_col
                    # pairs (a >= t, b = r) of this sub-chunk for every row t > r
                    b_diag += tl.where((rj > r)[:, None], tl.cumsum(b_qj * b_col, axis=0, reverse=True), 0.)
                b_dq = (b_dqi + b_dqo + b_dqd + b_dd[:, None] * b_kj) * scale
                tl.store(dq + (rj[:, None] * H + i_h) * K + ok[None, :], b_dq.to(dq.dtype.element_ty), mask=m_jk)
                b_qbefore += b_qj * (b_dqi + b_dqo)
                b_qinj += tl.sum(b_qj * b_dqi, axis=0)
                b_dkdd += b_dd[:, None] * b_qj
                b_qa = tl.load(q + (tq[:, None] * H + i_h) * K + ok[None, :], mask=m_ak, other=0.)
                b_doa = tl.load(do + (tq[:, None] * H + i_h) * V + ov[None, :], mask=ma[:, None] & mv[None, :],
                                other=0.)
                b_dko += _dot(tl.trans(_dot(b_doa, tl.trans(b_vj), DOT)), b_qa * b_dga, DOT) * tl.exp(b_gm[None, :] - b_gj)
                # pairs with the query after this sub-chunk and the key before it, both in the chunk
                b_span += tl.sum(b_qa * b_dgn * _dot(_dot(b_doa, tl.trans(b_vb), DOT), b_kgb, DOT), axis=0)
                for tt in range(0, BC):
                    t = r0 + tt
                    mt = t < eos
                    b_qt = tl.load(q + (t * H + i_h) * K + ok, mask=ok < tl.where(mt, K, 0), other=0.).to(tl.float32)
                    b_gt = tl.load(gc + (t * HKV + i_hk) * K + ok, mask=ok < tl.where(mt, K, 0), other=0.)
                    b_dot = tl.load(do + (t * H + i_h) * V + ov, mask=ov < tl.where(mt, V, 0), other=0.).to(tl.float32)
                    b_dat = tl.sum(b_vjf * b_dot[None, :], axis=1)
                    m = rj < tl.where(mt, t, -1)
                    b_dkd += b_dat[:, None] * b_qt[None, :] * tl.exp(
                        tl.where(m[:, None], b_gt[None, :] - b_gj, float("-inf")))
            b_dk = b_dki + (b_dko + b_dkd) * scale + b_dkdd * scale
            tl.store(dk + (rj[:, None] * HKV + i_hk) * K + ok[None, :], b_dk.to(dk.dtype.element_ty), mask=m_jk)
            b_dgj = tl.cumsum(b_qbefore * scale, axis=0, reverse=True) + b_diag * scale
            b_dgj += _excl_cumsum(b_kj * (b_dki + b_dko * scale), BC)
            b_dgj += (b_span * scale + b_outer + b_qlater + tl.sum(tl.where(mb[:, None], b_kout, 0.), axis=0))[None, :]
            b_qlater += b_qinj * scale
            tl.store(dg + (rj[:, None] * HKV + i_hk) * K + ok[None, :], b_dgj, mask=m_jk)


def gla_states(k, v, g, initial_state, info: SeqInfo, *, store_gc=True, output_final_state=False,
               normalizer=False, initial_z=None):
    """Run the chunk-state kernel. Returns gc (fp32, g's shape), the states
    [num_states, HKV, K, V] (fp32), the final state [N, HKV, K, V] or None, and for
    `normalizer` the z states [num_states, HKV, K] and the final z [N, HKV, K] or None."""
    TT, HKV, K = k.shape
    V = v.shape[-1]
    scalar = g.dim() == 2
    dev = k.device
    gc = torch.empty(g.shape, dtype=torch.float32, device=dev) if store_gc else k
    h = torch.empty(info.num_states, HKV, K, V, dtype=torch.float32, device=dev)
    ht = torch.empty(info.N, HKV, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    z = torch.empty(info.num_states, HKV, K, dtype=torch.float32, device=dev) if normalizer else None
    zt = torch.empty(info.N, HKV, K, dtype=torch.float32, device=dev) if normalizer and output_final_state else None
    BK, BV = block(K, MAX_BLOCK), block(V, MAX_BLOCK)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), info.N * HKV)
    h0 = initial_state.contiguous() if initial_state is not None else h
    _gla_states_kernel[grid](
        k, v, g, gc, h, h0, ht if ht is not None else h, z if z is not None else h,
        initial_z.contiguous() if initial_z is not None else h, zt if zt is not None else h,
        info.cu, info.state_offsets,
        HKV=HKV, K=K, V=V, BT=info.chunk, BK=BK, BV=BV, SCALAR_G=scalar, USE_H0=initial_state is not None,
        STORE_HT=output_final_state, STORE_GC=store_gc, NORM=normalizer, DOT=dot_dtype(k.dtype),
    )
    return gc, h, ht, z, zt


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _gla_forward(q, k, v, g, scale, initial_state, output_final_state, info, out_dtype):
    TT, H, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    gc, h, ht, _, _ = gla_states(k, v, g, initial_state, info, output_final_state=output_final_state)
    o = torch.empty(TT, H, V, dtype=out_dtype, device=q.device)
    BK, BV = block(K), block(V, MAX_BLOCK)
    grid = (triton.cdiv(V, BV), info.num_chunks, H)
    if info.num_chunks:
        _gla_fwd_kernel[grid](
            q, k, v, gc, h, o, info.cu, info.chunks, info.state_offsets, scale,
            H=H, HKV=HKV, K=K, V=V, BT=info.chunk, BC=SUB_CHUNK_SIZE, BK=BK, BV=BV,
            SCALAR_G=g.dim() == 2, DOT=dot_dtype(q.dtype),
        )
    return o, ht


def _gla_backward(q, k, v, g, scale, initial_state, do, dht, info):
    TT, H, K = q.shape
    HKV, V = k.shape[1], v.shape[-1]
    scalar = g.dim() == 2
    DOT = dot_dtype(q.dtype)
    gc, h, _, _, _ = gla_states(k, v, g, initial_state, info)
    dh = torch.empty_like(h)
    BK, BV = block(K, MAX_BLOCK), block(V, MAX_BLOCK)
    _gla_dh_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), info.N * HKV)](
        q, do, gc, dh, dht if dht is not None else dh, info.cu, info.state_offsets, scale,
        H=H, HKV=HKV, K=K, V=V, BT=info.chunk, BK=BK, BV=BV, SCALAR_G=scalar, USE_DHT=dht is not None, DOT=DOT,
    )
    dgk = torch.einsum("nhkv,nhkv->nhk", h[:-1], dh[1:]).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    BKg = block(K, DQKG_BLOCK_K)
    NK = triton.cdiv(K, BKg)
    dg = torch.empty((NK,) + tuple(g.shape) if scalar else g.shape, dtype=torch.float32, device=q.device)
    if info.num_chunks:
        _gla_dv_kernel[(triton.cdiv(V, BV), info.num_chunks, HKV)](
            q, k, do, gc, dh, dv, info.cu, info.chunks, info.state_offsets, scale,
            H=H, HKV=HKV, K=K, V=V, BT=info.chunk, BC=SUB_CHUNK_SIZE, BK=block(K), BV=BV, SCALAR_G=scalar, DOT=DOT,
        )
        _gla_dqkg_kernel[(NK, info.num_chunks, HKV)](
            q, k, v, do, gc, h, dh, dgk, dq, dk, dg, info.cu, info.chunks, info.state_offsets, scale, TT,
            H=H, HKV=HKV, K=K, V=V, BT=info.chunk, BC=SUB_CHUNK_SIZE, BK=BKg, BV=block(V), SCALAR_G=scalar, DOT=DOT,
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_(), dg.zero_()
    if scalar:
        dg = dg.sum(0)
    dh0 = dh[info.state_offsets.long()] if initial_state is not None else None
    return dq, dk, dv, dg.to(g.dtype), dh0


class TritonChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, info, out_dtype):
        o, ht = _gla_forward(q, k, v, g, scale, initial_state, output_final_state, info, out_dtype)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.info = scale, info
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = _gla_backward(q, k, v, g, ctx.scale, initial_state, do.contiguous(),
                                            dht.contiguous() if dht is not None else None, ctx.info)
        if dh0 is not None:
            dh0 = dh0.to(initial_state.dtype)
        return dq, dk, dv, dg, dh0, None, None, None, None


def _check_triton_gla(q, k, v, g):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"triton_chunk_gla supports fp32/bf16/fp16 inputs, got {name}.dtype={x.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got K={q.shape[-1]}, V={v.shape[-1]}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def triton_chunk_gla(
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
    """Chunked gated linear attention (Triton), differentiable in q, k, v, g and initial_state.

    Args:
        q: [B, T, H, K]; k: [B, T, HKV, K]; v: [B, T, HKV, V]; H % HKV == 0; K, V <= 256.
        g: [B, T, HKV, K] per-channel or [B, T, HKV] per-head log decay (<= 0).
        scale: multiplies the output.
        initial_state: [N, HKV, K, V] (N = B, or the number of packed sequences).
        output_final_state: also return the fp32 state after the last token.
        cu_seqlens: [N + 1] packed sequence bounds (B == 1); the state restarts per sequence.

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] fp32 or None.
    """
    return chunk_gla_autograd(q, k, v, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens, out_dtype=q.dtype)


def chunk_gla_autograd(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, out_dtype):
    """`triton_chunk_gla` with the output dtype chosen (fp32 keeps a 16-bit run's output unrounded)."""
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    _check_triton_gla(q, k, v, g)
    B, T, H, K = q.shape
    info = SeqInfo(B, T, cu_seqlens, CHUNK_SIZE, q.device)
    o, ht = TritonChunkGLA.apply(_flatten(q), _flatten(k), _flatten(v), _flatten(g),
                                 initial_state, float(scale), output_final_state, info, out_dtype)
    return o.view(B, T, H, v.shape[-1]), ht
