"""Chunked gated linear attention in PyTorch (the CPU path).

The sequence is cut into chunks of `chunk_size` tokens. Inside a chunk the output is a
masked matrix product; across chunks the recurrent state [K, V] is carried by a short
Python loop. With b_t the cumulative log gate inside a chunk (b_t <= b_s <= 0 for s <= t):

    o_t = scale * ( (q_t * exp(b_t)) S_0  +  sum_{s <= t} (q_t * exp(b_t - b_s)) . k_s  v_s )
    S_C = exp(b_C) * S_0 + sum_s (k_s * exp(b_C - b_s))^T v_s

The cumulative gates are summed in fp64 and every exponent is a difference taken in fp64
before rounding, so long chunks of strong decay keep fp32 gate gradients accurate. The
state recurrence only uses exponents <= 0 (exp(b_C), exp(b_C - b_s)).

Intra-chunk scores, fast path (bounded exponents). The decay is factorised at a reference
ref = (b_first + b_last) / 2 per chunk and channel (per head for scalar gates):

    exp(b_t - b_s) = exp(b_t - ref) * exp(ref - b_s),   A = (q * exp(b - ref)) (k * exp(ref - b))^T

so a chunk's scores are one matmul and a causal mask, for per-channel and per-head gates
alike, with no [C, C, K] decay tensor. The factors are not <= 1, but they are bounded: with
the chunk's decay range R = max over channels of (b_first - b_last), |b_t - ref| <= R / 2.
A chunk takes this path only when R < 40 and ref >= -60, so every factor lies in
[e^-20, e^20] (overflow is impossible: fp32 reaches e^88, fp64 e^709; no factor is
subnormal), exp(ref) >= e^-60 (the factor q exp(b) = (q exp(b - ref)) exp(ref) and the
states are rescaled by) is a normal fp32 number, and a masked (future, s > t) score is at most
e^40 |q_t| |k_s|, finite unless |q| |k| > 1e21. Each factor is computed in fp64 and rounded
once, so the products carry fp32 rounding only: the path is exact to fp32, whatever R is below
the bound. Chunks over the bound (strong decay, e.g. -5..-20 per token, or a very strong gate
on a chunk's first token) take the exact fallback below, chosen per chunk (and per batch
row and KV head) within one call, so a few strongly decaying chunks do not slow the rest.

Exact fallback (exponents <= 0). Scalar gates zero the [C, C] decay matrix above the diagonal
before the exponential and after it (no exp of -inf). Per-channel gates use secondary sub-chunks:
between two different sub-chunks the decay is split at a reference row (the last row before the
query sub-chunk), q * exp(b_t - b_ref) times k * exp(b_ref - b_s), both factors <= 1; inside a
diagonal sub-chunk block the [c, c, K] decay tensor is formed explicitly (masked the same way),
and recomputed in the backward pass instead of stored.

Decays that are subnormal are flushed to zero: every exponential of the fallback, and the chunk
decay exp(b_C) of both paths, is 0 where its value, rounded to the accumulation dtype, would be
below that dtype's smallest normal number (exponent below -87.3 in fp32, -708.4 in fp64; see
`_exp`). Exponentials with such results, or of -inf, and products with subnormal factors, run
~100x slower on the CPU. The flush changes no normal value (a gate gradient of e^-75 in fp32
keeps its accuracy), only values below 1.2e-38 in fp32 (2.2e-308 in fp64). The decays are not
floored higher (at sqrt of the smallest normal, which would keep even products of two of them
normal), since that would change such small gradients; products of two normal decays may still
underflow inside the sub-chunk matrix products of strongly decaying per-channel chunks, which
stay slower.

Gradients flow through autograd; small autograd Functions shape them: the fast path's gate
gradient leaves out the diagonal s = t (decay exactly 1, whose two equal and opposite terms
would cancel only up to rounding; see `_Factorised`); the state-increment terms
k_s exp(b_C - b_s), as large as k whatever the decay, reach g through their own exclusive
cumulative sum (`_Suffix`), so a gate gradient of 1e-13 under strong decay is not rounded
away against them; the output relayout returns its gradient contiguous once.

Chunks of 32 tokens are the fastest on CPU (64 and 128 trade a few fewer state steps for
twice and four times the masked score work). Long sequences run in segments of about 2^20
elements of q that carry the state, so every temporary stays cache-sized.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..utils import check_gla_inputs, sequence_spans, tracks_grad

_SUB_CHUNK = 8
_DIAG_BUDGET = 1 << 23  # elements of the [.., c, c, K] temporary per slice
_MAX_RANGE = 40.0  # fast path: chunk decay range below this, so exp(+-(b - ref)) < e^20
_MIN_REF = -60.0  # ... and exp(ref) >= e^-60 stays a normal fp32 number
_SEGMENT_ELEMENTS = 1 << 20  # B * tokens * H * head size per segment of a long sequence


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, chunked.

    Args:
        q: [B, T, H, K] queries (already feature-mapped).
        k: [B, T, HKV, K] keys (already feature-mapped); H % HKV == 0, query head h reads
            the state of KV head h // (H // HKV).
        v: [B, T, HKV, V] values.
        g: [B, T, HKV, K] per-channel or [B, T, HKV] per-head log decay, all <= 0.
        scale: multiplies the output.
        initial_state: [N, HKV, K, V], N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] cumulative lengths of packed sequences (requires B == 1);
            the state restarts at every sequence start.
        chunk_size: tokens per chunk (any size is exact; 32 is the fastest on CPU).

    Returns:
        o: [B, T, H, V] in the dtype of q; final_state: [N, HKV, K, V] in fp32 (fp64 for
        fp64 inputs) or None. Differentiable w.r.t. q, k, v, g and initial_state.
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    n_seg = math.ceil(B * T * H * max(K, v.shape[-1]) / _SEGMENT_ELEMENTS)
    span = math.ceil(T / n_seg / chunk_size) * chunk_size
    if cu_seqlens is not None or T <= span:
        return _chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    # Long sequences go in cache-sized segments that carry the state: the same arithmetic, but
    # every temporary stays small (16k tokens: ~1.6x faster on CPU, and a fraction of the peak).
    out = None if tracks_grad(q, k, v, g, initial_state) else q.new_empty(B, T, H, v.shape[-1])
    outs, state = [], initial_state
    # split, not slicing: its backward is one concatenation (a slice's fills a zero tensor per piece)
    pieces = zip(*(x.split(span, dim=1) for x in (q, k, v, g)), range(0, T, span))
    for qs, ks, vs, gs, start in pieces:
        o, state = _chunk_gla(qs, ks, vs, gs, scale, state, True, None, chunk_size,
                              out=None if out is None else out[:, start : start + span])
        outs.append(o)
    return (torch.cat(outs, dim=1) if out is None else out), (state if output_final_state else None)


class _Rows(NamedTuple):
    """How `_chunk_gla` lays the tokens out in rows of whole chunks: B' rows of NC chunks. A
    batch keeps its B rows, zero-padded at the end (dst None); packed sequences share one row,
    each starting on a chunk boundary, token i of the input at position dst[i]."""

    Bp: int  # rows B'
    NC: int  # chunks per row
    dst: torch.Tensor | None  # [T] position in the row of each packed token; None for a batch
    spans: list[tuple[int, int, int]]  # (batch row, start, end) of every sequence
    n_chunks: list[int]  # chunks of every packed sequence ([] for a batch)


def _chunk_rows(B: int, T: int, C: int, cu_seqlens, dev) -> _Rows:
    """The chunk layout of B rows of T tokens, or of the packed sequences of cu_seqlens [N + 1]."""
    spans = sequence_spans(B, T, cu_seqlens)
    if cu_seqlens is None:
        return _Rows(B, max(1, math.ceil(T / C)), None, spans, [])
    offsets, pos, n_chunks = [], 0, []
    for _, s, e in spans:
        nc = math.ceil((e - s) / C)
        offsets.append(pos)
        n_chunks.append(nc)
        pos += nc * C
    dst = torch.cat([torch.arange(o, o + e - s, device=dev) for o, (_, s, e) in zip(offsets, spans)])
    return _Rows(1, max(1, pos // C), dst, spans, n_chunks)


def _pack(x: torch.Tensor, rows: _Rows, C: int, acc) -> torch.Tensor:
    """[B, T, ...] -> [B', NC * C, ...] in dtype `acc`, zeros where no token lies."""
    x = x.to(acc)
    B, T = x.shape[:2]
    Tp = rows.NC * C
    if rows.dst is None:
        if Tp != T:
            x = torch.cat([x, x.new_zeros((B, Tp - T) + tuple(x.shape[2:]))], dim=1)
        return x
    return x.new_zeros((1, Tp) + tuple(x.shape[2:])).index_copy(1, rows.dst, x)


def _chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, out=None):
    """`chunk_gla` on checked inputs, in one piece; without autograd, `out` ([B, T, H, V]) can
    receive the output."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = _chunk_rows(B, T, chunk_size, cu_seqlens, q.device)
    # o_intra [B' HKV NC, C * G, V] (rows ordered (token, query head)), qx [B' HKV NC, C * G, K] with
    # qx S_in sfac = scale q_t exp(b_t) S_in, U [.., NC, K, V], decay exp(b_C) [.., NC, K or 1].
    o_intra, qx, sfac, U, decay = _packed_intra_terms(q, k, v, g, rows, chunk_size, scale, acc)
    if initial_state is not None:
        init = initial_state.to(acc)
    else:
        init = torch.zeros(len(rows.spans), HKV, K, V, dtype=acc, device=q.device)
    S_in, finals = _chunk_states(init, decay, U, rows)
    del U  # temporaries freed early keep the peak (and fresh pages) low
    if not isinstance(sfac, float):
        S_in = S_in.mul_(sfac.unsqueeze(-1))

    # o = scale * q exp(b) S_in + the (already scaled) intra-chunk part, as one fused GEMM.
    o = o_intra.baddbmm_(qx, S_in.view(-1, K, V))  # in place on a base tensor: no copies in backward
    del o_intra, qx, S_in
    final = finals if output_final_state else None
    if out is not None:
        G, Tp = H // HKV, rows.NC * chunk_size
        out.view(B, T, HKV, G, V).copy_(o.view(rows.Bp, HKV, Tp, G, V)[:, :, :T].transpose(1, 2))
        return out, final
    return _unpack_output(o, rows, T, H, HKV, chunk_size).to(q.dtype), final


def _packed_intra_terms(q, k, v, g, rows: _Rows, C: int, scale: float, acc):
    """`_intra_terms` (outputs documented at `_chunk_gla`) of q [B, T, H, K], k [B, T, HKV, K],
    v [B, T, HKV, V] and g [B, T, HKV, K] or [B, T, HKV], laid out in chunks by `rows`; the packed
    copies are freed on return."""
    K, HKV, V = q.shape[-1], k.shape[2], v.shape[-1]
    Bp, NC, G = rows.Bp, rows.NC, q.shape[2] // HKV
    scalar = g.dim() == 3
    # q [B', NC, C, HKV, G, K], k [B', NC, C, HKV, K], v [B', NC, C, HKV, V]: views where possible.
    qv = _pack(q, rows, C, acc).reshape(Bp, NC, C, HKV, G, K)
    kv = _pack(k, rows, C, acc).reshape(Bp, NC, C, HKV, K)
    vc = _pack(v, rows, C, acc).reshape(Bp, NC, C, HKV, V).permute(0, 3, 1, 2, 4).contiguous()  # [B', HKV, NC, C, V]
    # Cumulative gates in fp64, [B', HKV, NC, C, K or 1]: exponents are differences of large
    # sums, formed before rounding.
    gv = _pack(g, rows, C, acc).reshape(Bp, NC, C, HKV, K if not scalar else 1).permute(0, 3, 1, 2, 4)
    b = gv.to(torch.float64, memory_format=torch.contiguous_format)
    b = b.cumsum_(3) if b.data_ptr() != gv.data_ptr() else b.cumsum(3)  # in place on a copy only
    # b_C - b_s, whose gradient reaches g without cancelling (see `_Suffix`); only under autograd.
    suffix = _Suffix.apply(gv, b.detach()) if tracks_grad(gv) else None
    return _intra_terms(qv, kv, vc, b, suffix, scale, scalar)


def _chunk_states(init: torch.Tensor, decay: torch.Tensor, U: torch.Tensor, rows: _Rows):
    """The state entering every chunk, S_in [B', HKV, NC, K, V], and every sequence's final
    state [N, HKV, K, V]: S <- exp(b_C) S + U_c over the (short) chunk axis, from init
    [N, HKV, K, V], restarting at every packed sequence. decay [B', HKV, NC, K or 1] (exp(b_C)),
    U [B', HKV, NC, K, V] (each chunk's own increment). Without autograd, a batch's states are
    written in place (no stacking pass over them)."""
    decays = decay.unsqueeze(-1).unbind(2)  # NC x [B', HKV, K or 1, 1]
    Us = U.unbind(2)  # NC x [B', HKV, K, V]
    if rows.dst is not None:
        states, finals = _packed_states(init, decays, Us, rows.n_chunks)
    elif tracks_grad(init, decay, U):
        states, finals = _batch_states(init, decays, Us)
    else:  # the states go straight into place: no stacking pass over them
        S_in = torch.empty_like(U)
        _, finals = _batch_states(init, decays, Us, out=S_in)
        return S_in, finals
    return torch.stack(states, dim=2), finals


def _batch_states(init, decays, Us, out=None):
    """Chunk by chunk for B rows of one sequence each: the states entering the chunks (NC x
    [B, HKV, K, V]) and the final states [B, HKV, K, V]. Without autograd, `out` [B, HKV, NC,
    K, V] can receive the states entering the chunks (each step writes the next one there)."""
    slots = [None] * (len(Us) + 1) if out is None else out.unbind(2) + (None,)
    S = init if out is None else slots[0].copy_(init)
    states = []
    for decay_c, U_c, into in zip(decays, Us, slots[1:]):
        states.append(S)
        S = torch.addcmul(U_c, S, decay_c, out=into)
    return states, S


def _packed_states(init, decays, Us, n_chunks: list[int]):
    """Chunk by chunk along one row of packed sequences, each starting from its init [1, HKV,
    K, V] and taking n_chunks[n] chunks: the states entering the chunks (NC x [1, HKV, K, V]) and
    the final states [N, HKV, K, V] (init itself for an empty sequence)."""
    starts, ends, finals = {}, {}, [None] * len(n_chunks)
    c0 = 0
    for n, nc in enumerate(n_chunks):
        if nc == 0:
            finals[n] = init[n]
        else:
            starts[c0] = n
            ends[c0 + nc - 1] = n
        c0 += nc
    S = init[:1]
    states = []
    for c in range(len(Us)):
        if c in starts:
            S = init[starts[c] : starts[c] + 1]
        states.append(S)
        S = torch.addcmul(Us[c], S, decays[c])
        if c in ends:
            finals[ends[c]] = S[0]
    return states, torch.stack(finals)


def _unpack_output(o: torch.Tensor, rows: _Rows, T: int, H: int, HKV: int, C: int) -> torch.Tensor:
    """o [B' HKV NC, C * G, V] (rows ordered (token, query head)) back to the input's tokens,
    [B, T, H, V]."""
    Bp, NC, V = rows.Bp, rows.NC, o.shape[-1]
    o = _Permute.apply(o.view(Bp, HKV, NC, C, H // HKV, V), (0, 2, 3, 1, 4, 5)).view(Bp, NC * C, H, V)
    if rows.dst is not None:
        return o.index_select(1, rows.dst)
    return o[:, :T] if NC * C != T else o


def _intra_terms(qv, kv, vc, b, suffix, scale, scalar):
    """Intra-chunk terms: the factorised fast path on every chunk whose decay allows it, the
    exact fallback (`_scalar_gate_terms` / `_channel_gate_terms`) on the others.

    qv [B', NC, C, HKV, G, K] and kv [B', NC, C, HKV, K] (views of the packed inputs),
    vc [B', HKV, NC, C, V], b [B', HKV, NC, C, K or 1] cumulative log gates in fp64, suffix
    b_C - b (same shape, from `_Suffix`; None without autograd).
    Returns o_intra [M, C * G, V] (M = B' HKV NC; scaled; rows ordered (t, g)), qx [M, C * G, K],
    sfac [.., NC, K or 1] such that scale q_t exp(b_t) S = qx_t (sfac * S), the state
    increment U [.., NC, K, V] and the chunk decay exp(b_C) [.., NC, K or 1].
    """
    Bp, NC, C, HKV, G, K = qv.shape
    V = vc.shape[-1]
    acc = qv.dtype
    qc = qv.permute(0, 3, 1, 2, 4, 5)  # [B', HKV, NC, C, G, K]
    kc = kv.permute(0, 3, 1, 2, 4)  # [B', HKV, NC, C, K]
    first, last = b[:, :, :, 0], b[:, :, :, -1]  # [.., NC, K or 1]
    decay = _exp(last, acc)
    with torch.no_grad():
        # The reference is a constant shift (the result does not depend on it): no gradient.
        ref = 0.5 * (first + last)
        slow = ((first - last).amax(-1) >= _MAX_RANGE) | (ref.amin(-1) < _MIN_REF)  # [B', HKV, NC]
    n_slow = int(slow.sum())
    b_exact = b[..., 0] if scalar else b  # the fallback's layout, [.., NC, C(, K)]
    if n_slow == slow.numel():
        if suffix is None:  # no autograd: the values alone
            suffix = last.unsqueeze(-2) - b
        o_intra, qb, sfac, U = _exact_terms(qc, kc, vc, b_exact, suffix, scale)
        return o_intra.clone(), qb, sfac, U, decay  # a base tensor: updated in place later
    if n_slow:
        sel = slow.nonzero(as_tuple=True)
        b_slow = b_exact[sel]  # a copy, taken before b is overwritten below
        suffix_slow = suffix[sel] if suffix is not None else last[sel].unsqueeze(-2) - b[sel]
        ref = ref.masked_fill(slow.unsqueeze(-1), 0.0)
    x_last = (last - ref).detach()  # b_C - ref: a constant here, b_C's gradient comes through suffix
    x = b.sub_(ref.unsqueeze(-2))  # b_t - ref (in place, fp64): |x| <= range / 2 < 20 on the fast chunks
    if n_slow:
        x.masked_fill_(slow[..., None, None], 0.0)  # finite stand-ins, replaced below
    # q_t exp(b_t - ref), k_s exp(b_C - b_s) and the scaled causal scores
    qt, kC, A = _Factorised.apply(qc, kc, x, x_last, suffix, scale)
    del x, b
    M = Bp * HKV * NC
    o_intra = torch.bmm(A.view(M, C * G, C), vc.view(M, C, V))
    del A
    qt = qt.view(M, C * G, K)
    U = torch.matmul(kC.transpose(-1, -2), vc)
    del kC
    sfac = (ref.exp() * scale).to(acc)  # qt (sfac S) = scale q_t exp(b_t) S
    if n_slow:
        idx = slow.flatten().nonzero().squeeze(1)
        o_s, qb_s, sf_s, U_s = _exact_terms(qc[sel][None, None], kc[sel][None, None], vc[sel][None, None],
                                            b_slow[None, None], suffix_slow[None, None], scale)
        o_intra = o_intra.index_copy(0, idx, o_s.view(-1, C * G, V))
        qt = qt.index_copy(0, idx, qb_s.view(-1, C * G, K))
        U = U.view(M, K, V).index_copy(0, idx, U_s[0, 0]).view(U.shape)
        sfac = sfac.masked_fill(slow.unsqueeze(-1), sf_s)
    return o_intra, qt, sfac, U, decay


def _causal(C: int, scale: float, dtype, device, diagonal: int = 0) -> torch.Tensor:
    """[C, 1, C]: scale where s <= t + diagonal, else 0 (rows t, query heads, columns s)."""
    return torch.full((C, C), scale, dtype=dtype, device=device).tril(diagonal).unsqueeze(1)


class _Factorised(torch.autograd.Function):
    """The factorised intra-chunk products of one (sub-)chunk decomposition.

    qc [.., C, G, K] and kc [.., C, K] (strided views), x = b - ref [.., C, K or 1] and
    x_last = b_C - ref [.., K or 1] (a constant) in fp64, |x| < 20, and suffix = b_C - b
    [.., C, K or 1] from `_Suffix` (its values are not read). Returns (all contiguous)
    qt = q exp(x) [.., C * G, K], kC = k exp(x_last - x) [.., C, K] and the causal scores
    A[t, g, s] = scale * qt[t, g] . (k exp(-x))[s] for s <= t, [.., C * G, C].

    The backward forms the gate gradient so that nothing large cancels in rounding:
    - the diagonal s = t (decay exactly 1) adds to dq and dk only: its gate terms are equal
      and opposite, but can be far larger than the true gate gradient (when exp(b) is tiny);
    - the k_s exp(b_C - b_s) terms of the state increment, of the size of k whatever the
      decay, go to `suffix`, whose gradient reaches each g_j as the sum over s < j alone;
      handed to b_C and (negated) to b_s they would cancel only in the cumulative sum of the
      gate gradient, after rounding away a gradient far smaller than themselves.
    """

    @staticmethod
    def forward(ctx, qc, kc, x, x_last, suffix, scale):
        C, G, K = qc.shape[-3:]
        lead = qc.shape[:-3]
        acc = qc.dtype
        e_q = x.exp().to(acc)  # in fp64, rounded once
        f = x_last.exp().to(acc).unsqueeze(-2)  # exp(b_C - ref)
        qt = torch.mul(qc, e_q.unsqueeze(-2), out=torch.empty(qc.shape, dtype=acc, device=qc.device))
        kt = torch.div(kc, e_q, out=torch.empty(kc.shape, dtype=acc, device=kc.device))  # k_s exp(ref - b_s)
        qt = qt.view(lead + (C * G, K))
        A = torch.matmul(qt, kt.transpose(-1, -2))
        A.view(lead + (C, G, C)).mul_(_causal(C, scale, acc, qt.device))
        kC = kt * f
        ctx.save_for_backward(qt, kt, kC, e_q, f)
        ctx.scale = scale
        return qt, kC, A

    @staticmethod
    def backward(ctx, dqt, dkC, dA):
        qt, kt, kC, e_q, f = ctx.saved_tensors
        C, K = kt.shape[-2:]
        G = qt.shape[-2] // C
        lead = kt.shape[:-2]
        scalar = e_q.shape[-1] == 1
        dA = dA.view(lead + (C, G, C))
        dAs = (dA * _causal(C, ctx.scale, dA.dtype, dA.device, -1)).view(lead + (C * G, C))  # s < t
        dd = dA.diagonal(dim1=-3, dim2=-1).transpose(-1, -2) * ctx.scale  # [.., C(t), G]: s = t
        Gq = torch.matmul(dAs, kt)  # [.., C * G, K]
        Gk = torch.matmul(dAs.transpose(-1, -2), qt)  # [.., C, K]
        if dqt is not None:
            Gq += dqt
        Gq = Gq.view(lead + (C, G, K))
        q3 = qt.view(lead + (C, G, K))
        dx = ((Gq * q3).sum(-2) - Gk * kt).double()  # [.., C, K]
        dsuffix = None
        if dkC is not None:
            if ctx.needs_input_grad[4]:
                dsuffix = (dkC * kC).double()  # the k_s exp(b_C - b_s) terms
            Gk.addcmul_(dkC, f)
        if scalar:
            dx = dx.sum(-1, keepdim=True)
            dsuffix = None if dsuffix is None else dsuffix.sum(-1, keepdim=True)
        # The diagonal (decay 1) enters dq and dk only.
        Gq.addcmul_(dd.unsqueeze(-1), kt.unsqueeze(-2))
        for g in range(G):
            Gk.addcmul_(dd[..., g : g + 1], q3[..., g, :])
        return Gq.mul_(e_q.unsqueeze(-2)), Gk.div_(e_q), dx, None, dsuffix, None


class _Suffix(torch.autograd.Function):
    """suffix_s = b_C - b_s = sum of g over (s, C] inside each chunk, fp64, [.., C, K or 1].

    Forward from the cumulative sums b (no extra pass over g); backward straight to g: g_j
    lies in suffix_s for s < j, so dg_j = sum_{s < j} dsuffix_s: an exclusive cumulative sum,
    with no pair of large terms left to cancel."""

    @staticmethod
    def forward(ctx, gv, b):
        ctx.dtype = gv.dtype
        return b[..., -1:, :] - b

    @staticmethod
    def backward(ctx, dsuffix):
        dg = torch.zeros_like(dsuffix)
        torch.cumsum(dsuffix[..., :-1, :], dim=-2, out=dg[..., 1:, :])
        return dg.to(ctx.dtype), None


class _Permute(torch.autograd.Function):
    """x.permute(dims) as a contiguous copy whose gradient also comes back contiguous (once,
    instead of once per consumer of a strided gradient)."""

    @staticmethod
    def forward(ctx, x, dims):
        ctx.dims = dims
        return x.permute(dims).contiguous()

    @staticmethod
    def backward(ctx, grad):
        inverse = [0] * len(ctx.dims)
        for i, d in enumerate(ctx.dims):
            inverse[d] = i
        return grad.permute(inverse).contiguous(), None


def _exact_terms(qc, kc, vc, b, suffix, scale):
    """The exact fallback on chunks [B', HKV, NC]; qc [.., NC, C, G, K] and kc [.., NC, C, K] may
    be strided views, suffix = b_C - b [.., NC, C, K or 1]. Returns o_intra [M, C * G, V],
    qb = scale q exp(b) [M, C * G, K] (M = B' HKV NC), 1.0 (its state factor, see
    `_intra_terms`) and U [.., NC, K, V]."""
    Bp, HKV, NC, C, G, K = qc.shape
    terms = _scalar_gate_terms if b.dim() == 4 else _channel_gate_terms
    o_intra, qb, U, _ = terms(qc.contiguous(), kc.contiguous(), vc, b, suffix, scale)
    return o_intra.reshape(-1, C * G, o_intra.shape[-1]), qb.reshape(-1, C * G, K), 1.0, U


def _scalar_gate_terms(qc, kc, vc, b, suffix, scale):
    """Per-head gates, b: [B', HKV, NC, C] cumulative inside each chunk (fp64), suffix
    b_C - b [.., NC, C, 1].

    Returns the scaled intra-chunk output [.., NC, C * G, V], scale * q exp(b)
    [.., NC, C, G, K], the chunk's state increment U [.., NC, K, V] and its decay
    exp(b_C) [.., NC, 1].
    """
    Bp, HKV, NC, C, G, K = qc.shape
    acc = qc.dtype
    # exp(b_t - b_s) for s < t, zeroed before exp and after it; the diagonal is the constant 1 (no gradient).
    below = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril(-1)
    eye = torch.eye(C, dtype=acc, device=qc.device)
    diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~below, 0.0)
    E = (_exp(diff, acc).masked_fill(~below, 0.0) + eye) * scale
    A = torch.matmul(qc.view(Bp, HKV, NC, C * G, K), kc.transpose(-1, -2))
    A = A.view(Bp, HKV, NC, C, G, C) * E.unsqueeze(-2)
    o_intra = torch.matmul(A.view(Bp, HKV, NC, C * G, C), vc)
    qb = qc * (_exp(b, acc) * scale)[..., None, None]
    kC = kc * _exp(suffix, acc)  # k_s exp(b_C - b_s)
    U = torch.matmul(kC.transpose(-1, -2), vc)
    return o_intra, qb, U, _exp(b[..., -1:], acc)


def _channel_gate_terms(qc, kc, vc, b, suffix, scale):
    """Per-channel gates, b and suffix = b_C - b: [B', HKV, NC, C, K] (fp64); returns as
    `_scalar_gate_terms`, decay [.., NC, K]."""
    Bp, HKV, NC, C, G, K = qc.shape
    V = vc.shape[-1]
    acc = qc.dtype
    c = math.gcd(C, _SUB_CHUNK)
    n = C // c
    bs = b.view(Bp, HKV, NC, n, c, K)
    last = bs[:, :, :, :, -1]  # [.., NC, n, K]: cumulative gate at the last row of each sub-chunk
    # Reference row of sub-chunk i: the last row of sub-chunk i - 1 (b = 0 before the chunk).
    ref = torch.cat([torch.zeros_like(last[:, :, :, :1]), last[:, :, :, :-1]], dim=3)
    local = (bs - ref.unsqueeze(-2)).to(acc)  # b_t - ref_i <= 0, small enough to difference in acc
    qs = qc.view(Bp, HKV, NC, n, c, G, K)
    ks = kc.view(Bp, HKV, NC, n, c, K)

    qg = qs * _exp(local, acc).unsqueeze(-2)  # q_t exp(b_t - ref_i)
    kd = ks * _exp((last.unsqueeze(-2) - bs).to(acc), acc)  # k_s exp(last_j - b_s)
    A_diag = _DiagBlocks.apply(qs, ks * scale, local)  # scale * [.., NC, n, c * G, c]
    o_sub = torch.matmul(A_diag, vc.view(Bp, HKV, NC, n, c, V))  # [.., NC, n, c * G, V]
    if n > 1:
        # exp(b_t - b_s) = exp(b_t - ref_i) * exp(ref_i - last_j) * exp(last_j - b_s) for sub-chunks j < i.
        o_sub = list(o_sub.unbind(3))
        for i in range(1, n):
            between = _exp((ref[:, :, :, i : i + 1] - last[:, :, :, :i]).to(acc), acc) * scale  # [.., NC, i, K]
            kg = (kd[:, :, :, :i] * between.unsqueeze(-2)).view(-1, i * c, K)
            A_off = torch.bmm(qg[:, :, :, i].reshape(-1, c * G, K), kg.transpose(-1, -2))
            o_sub[i] = torch.baddbmm(o_sub[i].reshape(-1, c * G, V), A_off, vc[:, :, :, : i * c].reshape(-1, i * c, V))
        o_sub = torch.stack([o.view(Bp, HKV, NC, c * G, V) for o in o_sub], dim=3)
    o_intra = o_sub.view(Bp, HKV, NC, C * G, V)

    b_last = last[:, :, :, -1]  # [.., NC, K]
    qb = qg * (_exp(ref.to(acc), acc) * scale)[:, :, :, :, None, None, :]  # scale q_t exp(b_t)
    kC = kc * _exp(suffix, acc)  # k_s exp(b_C - b_s)
    U = torch.matmul(kC.transpose(-1, -2), vc)
    return o_intra, qb, U, _exp(b_last.to(acc), acc)


class _DiagBlocks(torch.autograd.Function):
    """A[t, g, s] = sum_k q[t, g, k] k[s, k] exp(b[t, k] - b[s, k]) for s <= t inside each sub-chunk.

    q: [..., n, c, G, K]; k, b: [..., n, c, K]  ->  A: [..., n, c * G, c] (rows ordered (t, g)).
    The [c, c, K] decay tensor is built slice by slice and never stored for backward. The
    diagonal s = t (decay 1) is added apart, so the gate gradient
    db = sum_g q * dq - k * dk only sums the off-diagonal terms and nothing large cancels.
    """

    @staticmethod
    def forward(ctx, q, k, b):
        ctx.save_for_backward(q, k, b)
        c, G = q.shape[-3], q.shape[-2]
        mask = torch.ones(c, c, dtype=torch.bool, device=b.device).triu().unsqueeze(-1)
        A = q.new_empty(q.shape[:-3] + (c, G, c))
        for sl in _slices(b):
            Ek = _decay(b[sl], mask).mul_(k[sl].unsqueeze(-3))  # [.., n, t, s, K]
            A[sl] = torch.matmul(q[sl], Ek.transpose(-1, -2))  # [.., n, t, G, s]
        A.diagonal(dim1=-3, dim2=-1).add_(torch.matmul(q, k.unsqueeze(-1)).squeeze(-1).transpose(-1, -2))
        return A.view(q.shape[:-3] + (c * G, c))

    @staticmethod
    def backward(ctx, dA):
        q, k, b = ctx.saved_tensors
        c, G = q.shape[-3], q.shape[-2]
        dA = dA.reshape(q.shape[:-3] + (c, G, c))
        mask = torch.ones(c, c, dtype=torch.bool, device=b.device).triu().unsqueeze(-1)
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        for sl in _slices(b):
            E = _decay(b[sl], mask)  # [.., n, t, s, K]
            dq[sl] = torch.matmul(dA[sl], E * k[sl].unsqueeze(-3))  # [.., n, t, G, K]
            W = torch.matmul(dA[sl].transpose(-1, -2), q[sl])  # [.., n, t, s, K]
            dk[sl] = W.mul_(E).sum(-3)
        db = (q * dq).sum(-2) - k * dk
        d_diag = dA.diagonal(dim1=-3, dim2=-1).transpose(-1, -2).unsqueeze(-1)  # [.., n, t, G, 1]
        dq.addcmul_(d_diag, k.unsqueeze(-2))
        dk += torch.matmul(d_diag.transpose(-1, -2), q).squeeze(-2)
        return dq, dk, db


def _decay(b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(b[t] - b[s]) where mask[t, s] is False, else 0 (and 0 where it would be subnormal, as
    in `_exp`): [..., c, K] -> [..., c(t), c(s), K]. No -inf and no subnormal number meets exp."""
    d = b.unsqueeze(-2) - b.unsqueeze(-3)
    zero = mask | (d < math.log(torch.finfo(b.dtype).tiny))
    return d.masked_fill_(zero, 0.0).exp_().masked_fill_(zero, 0.0)


def _exp(x: torch.Tensor, acc) -> torch.Tensor:
    """exp(x) rounded to `acc`, and 0 where that would be a subnormal number (x below the log of
    acc's smallest normal number): every normal value is kept, but exp never meets an argument
    whose result is subnormal (nor -inf), which runs ~100x slower on the CPU, and the products
    after it get no subnormal factor."""
    zero = x < math.log(torch.finfo(acc).tiny)
    return torch.where(zero, 0.0, x.masked_fill(zero, 0.0).exp().to(acc))


def _slices(b: torch.Tensor):
    """Index tuples over the chunk axis (dim 2) keeping the [.., c, c, K] temporaries bounded."""
    per_chunk = b[:, :, :1].numel() * b.shape[-2]
    step = max(1, _DIAG_BUDGET // max(per_chunk, 1))
    for start in range(0, b.shape[2], step):
        yield (slice(None), slice(None), slice(start, min(start + step, b.shape[2])))
