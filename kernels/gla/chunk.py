"""Chunked gated linear attention in PyTorch (the CPU path).

The sequence is cut into chunks of `chunk_size` tokens. Inside a chunk the output is a
masked matrix product; across chunks the recurrent state [K, V] is carried by a short
Python loop. With b_t the cumulative log gate inside a chunk (b_t <= b_s <= 0 for s <= t):

    o_t = scale * ( (q_t * exp(b_t)) S_0  +  sum_{s <= t} (q_t * exp(b_t - b_s)) . k_s  v_s )
    S_C = exp(b_C) * S_0 + sum_s (k_s * exp(b_C - b_s))^T v_s

Every exponent is kept <= 0, so strong decay underflows to zero instead of overflowing.
Scalar (per-head) gates mask the [C, C] decay matrix before the exponential. Per-channel
gates use secondary sub-chunks: between two different sub-chunks the decay is split at a
reference row (the last row before the query sub-chunk), q * exp(b_t - b_ref) times
k * exp(b_ref - b_s), both factors <= 1; inside a diagonal sub-chunk block the [c, c, K]
decay tensor is formed explicitly, and recomputed in the backward pass instead of stored.
The cumulative gates are summed in fp64 and every exponent is a difference taken in fp64
before rounding, so long chunks of strong decay keep fp32 gate gradients accurate.
"""
from __future__ import annotations

import math

import torch

from ..utils import check_gla_inputs, sequence_spans

_SUB_CHUNK = 8
_DIAG_BUDGET = 1 << 23  # elements of the [.., c, c, K] temporary per slice


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
    chunk_size: int = 64,
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
        chunk_size: tokens per chunk.

    Returns:
        o: [B, T, H, V] in the dtype of q; final_state: [N, HKV, K, V] in fp32 (fp64 for
        fp64 inputs) or None. Differentiable w.r.t. q, k, v, g and initial_state.
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    C = chunk_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    scalar = g.dim() == 3

    # Pack into [B', NC * C] rows: a plain pad for batches, per-sequence chunk alignment for varlen.
    spans = sequence_spans(B, T, cu_seqlens)
    if cu_seqlens is None:
        NC = max(1, math.ceil(T / C))
        Bp = B
        dst = None
    else:
        Bp = 1
        offsets, pos, n_chunks = [], 0, []
        for _, s, e in spans:
            nc = math.ceil((e - s) / C)
            offsets.append(pos)
            n_chunks.append(nc)
            pos += nc * C
        NC = max(1, pos // C)
        dst = torch.cat([torch.arange(o, o + e - s, device=dev) for o, (_, s, e) in zip(offsets, spans)])
    Tp = NC * C

    def pack(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc)
        if dst is None:
            if Tp != T:
                x = torch.cat([x, x.new_zeros((B, Tp - T) + tuple(x.shape[2:]))], dim=1)
            return x
        return x.new_zeros((1, Tp) + tuple(x.shape[2:])).index_copy(1, dst, x)

    # Rows of a chunk are (token, query head of the group): q [B', HKV, NC, C, G, K];
    # k, g: [B', HKV, NC, C, K]; v: [B', HKV, NC, C, V]; scalar g: [B', HKV, NC, C].
    qc = pack(q).reshape(Bp, NC, C, HKV, G, K).permute(0, 3, 1, 2, 4, 5).contiguous()
    kc = pack(k).reshape(Bp, NC, C, HKV, K).permute(0, 3, 1, 2, 4).contiguous()
    vc = pack(v).reshape(Bp, NC, C, HKV, V).permute(0, 3, 1, 2, 4).contiguous()
    # Cumulative gates in fp64: exponents are differences of large sums, formed before rounding.
    gp = pack(g).to(torch.float64).reshape((Bp, NC, C, HKV) + tuple(g.shape[3:])).cumsum(2)
    b = gp.permute((0, 3, 1, 2, 4) if not scalar else (0, 3, 1, 2)).contiguous()

    terms = _scalar_gate_terms if scalar else _channel_gate_terms
    o_intra, qb, U, decay = terms(qc, kc, vc, b, scale)

    # Inter-chunk recurrence over the (short) chunk axis.
    if initial_state is not None:
        init = initial_state.to(acc)
    else:
        init = torch.zeros(len(spans), HKV, K, V, dtype=acc, device=dev)
    decays = decay.unsqueeze(-1).unbind(2)  # NC x [B', HKV, K or 1, 1]
    Us = U.unbind(2)  # NC x [B', HKV, K, V]
    states = []
    if dst is None:
        S = init
        for c in range(NC):
            states.append(S)
            S = torch.addcmul(Us[c], S, decays[c])
        finals = S
    else:
        starts, ends, finals_list = {}, {}, [None] * len(spans)
        c0 = 0
        for n, nc in enumerate(n_chunks):
            if nc == 0:
                finals_list[n] = init[n]
            else:
                starts[c0] = n
                ends[c0 + nc - 1] = n
            c0 += nc
        S = init[:1]
        for c in range(NC):
            if c in starts:
                S = init[starts[c] : starts[c] + 1]
            states.append(S)
            S = torch.addcmul(Us[c], S, decays[c])
            if c in ends:
                finals_list[ends[c]] = S[0]
        finals = torch.stack(finals_list)
    S_in = torch.stack(states, dim=2)  # [B', HKV, NC, K, V]

    # o = scale * (q exp(b)) S_in + the (already scaled) intra-chunk part, as one fused GEMM.
    o = torch.baddbmm(o_intra.view(-1, C * G, V), qb.view(-1, C * G, K), S_in.view(-1, K, V))
    o = o.view(Bp, HKV, NC, C, G, V).permute(0, 2, 3, 1, 4, 5).reshape(Bp, Tp, H, V)
    o = o[:, :T] if dst is None else o.index_select(1, dst)
    return o.to(q.dtype), (finals if output_final_state else None)


def _scalar_gate_terms(qc, kc, vc, b, scale):
    """Per-head gates, b: [B', HKV, NC, C] cumulative inside each chunk (fp64).

    Returns the scaled intra-chunk output [.., NC, C * G, V], scale * q exp(b)
    [.., NC, C, G, K], the chunk's state increment U [.., NC, K, V] and its decay
    exp(b_C) [.., NC, 1].
    """
    Bp, HKV, NC, C, G, K = qc.shape
    acc = qc.dtype
    # exp(b_t - b_s) for s < t, masked before exp; the diagonal is the constant 1 (no gradient).
    below = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril(-1)
    eye = torch.eye(C, dtype=torch.float64, device=qc.device)
    E = ((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~below, float("-inf")).exp() + eye).to(acc) * scale
    A = torch.matmul(qc.view(Bp, HKV, NC, C * G, K), kc.transpose(-1, -2))
    A = A.view(Bp, HKV, NC, C, G, C) * E.unsqueeze(-2)
    o_intra = torch.matmul(A.view(Bp, HKV, NC, C * G, C), vc)
    qb = qc * (b.exp().to(acc) * scale)[..., None, None]
    b_last = b[..., -1:]
    kC = kc * (b_last - b).exp().to(acc).unsqueeze(-1)  # k_s exp(b_C - b_s)
    U = torch.matmul(kC.transpose(-1, -2), vc)
    return o_intra, qb, U, b_last.exp().to(acc)


def _channel_gate_terms(qc, kc, vc, b, scale):
    """Per-channel gates, b: [B', HKV, NC, C, K] (fp64); returns as `_scalar_gate_terms`, decay [.., NC, K]."""
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

    qg = qs * local.exp().unsqueeze(-2)  # q_t exp(b_t - ref_i)
    kd = ks * (last.unsqueeze(-2) - bs).to(acc).exp()  # k_s exp(last_j - b_s)
    A_diag = _DiagBlocks.apply(qs, ks * scale, local)  # scale * [.., NC, n, c * G, c]
    o_sub = torch.matmul(A_diag, vc.view(Bp, HKV, NC, n, c, V))  # [.., NC, n, c * G, V]
    if n > 1:
        # exp(b_t - b_s) = exp(b_t - ref_i) * exp(ref_i - last_j) * exp(last_j - b_s) for sub-chunks j < i.
        o_sub = list(o_sub.unbind(3))
        for i in range(1, n):
            between = (ref[:, :, :, i : i + 1] - last[:, :, :, :i]).to(acc).exp() * scale  # [.., NC, i, K]
            kg = (kd[:, :, :, :i] * between.unsqueeze(-2)).view(-1, i * c, K)
            A_off = torch.bmm(qg[:, :, :, i].reshape(-1, c * G, K), kg.transpose(-1, -2))
            o_sub[i] = torch.baddbmm(o_sub[i].reshape(-1, c * G, V), A_off, vc[:, :, :, : i * c].reshape(-1, i * c, V))
        o_sub = torch.stack([o.view(Bp, HKV, NC, c * G, V) for o in o_sub], dim=3)
    o_intra = o_sub.view(Bp, HKV, NC, C * G, V)

    b_last = last[:, :, :, -1]  # [.., NC, K]
    qb = qg * (ref.to(acc).exp() * scale)[:, :, :, :, None, None, :]  # scale q_t exp(b_t)
    kC = kd * (b_last.unsqueeze(-2) - last).to(acc).exp().unsqueeze(-2)  # k_s exp(b_C - b_s)
    U = torch.matmul(kC.view(Bp, HKV, NC, C, K).transpose(-1, -2), vc)
    return o_intra, qb, U, b_last.to(acc).exp()


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
    """exp(b[t] - b[s]) where mask[t, s] is False, else 0: [..., c, K] -> [..., c(t), c(s), K]."""
    return (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill_(mask, float("-inf")).exp_()


def _slices(b: torch.Tensor):
    """Index tuples over the chunk axis (dim 2) keeping the [.., c, c, K] temporaries bounded."""
    per_chunk = b[:, :, :1].numel() * b.shape[-2]
    step = max(1, _DIAG_BUDGET // max(per_chunk, 1))
    for start in range(0, b.shape[2], step):
        yield (slice(None), slice(None), slice(start, min(start + step, b.shape[2])))
