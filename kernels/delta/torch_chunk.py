"""The chunked gated delta rule in PyTorch (the CPU path), in the WY / UT form.

Per KV head, with S_0 the state entering a chunk and b_t the cumulative log gate inside it
(b_t <= b_s <= 0 for s <= t), the recurrence S_t = exp(g_t) S_{t-1} + k_t u_t^T has the
delta values

    u_s = beta_s (v_s - exp(g_s) k_s^T S_{s-1})
        = beta_s v_s - beta_s exp(b_s) k_s^T S_0 - sum_{r < s} beta_s exp(b_s - b_r) (k_s . k_r) u_r,

a unit lower-triangular system (I + A) u = beta V - beta exp(b) K S_0 with
A[s, r] = beta_s exp(b_s - b_r) k_s . k_r (r < s). One triangular solve per chunk against
diag(beta) gives the UT transform with the write strengths folded in, T = (I + A)^-1 diag(beta),
and with it U = T V and W = T exp(b) K, so u = U - W S_0 costs one matmul once S_0 is known:

    o_t = scale (exp(b_t) q_t S_0 + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) u_s)
    S_C = exp(b_C) S_0 + sum_s exp(b_C - b_s) k_s u_s^T

Only u and S go through the loop over chunks (two small matmuls per chunk); everything else,
the outputs included, runs for all chunks of a segment at once. Long inputs go in segments of
whole chunks that carry the state, so temporaries stay bounded (on the CPU, small enough to
stay in cache between the passes over them). Cumulative gates are summed in fp64 and every
decay is exp of a difference <= 0 taken in fp64 and rounded to the accumulation dtype (fp32
for fp32 and bf16 inputs), floored at sqrt(tiny) of that dtype (1e-19 in fp32: far below its
precision, and it keeps exp and the products after it clear of subnormal numbers, which are
slow on the CPU); entries above the diagonal are zeroed before the exponential (no overflow,
and no -inf) and after it. Gradients flow through autograd (the triangular solve included).
"""
from __future__ import annotations

import math

import torch

_SEGMENT_ELEMENTS = 1 << 24  # elements of the per-chunk [C, C] temporaries per segment of a long input
_CPU_SEGMENT_ELEMENTS = 1 << 18  # the same on the CPU: about 1 MiB of them, so they stay in cache
_CPU_CHUNK = 32  # default chunk size on the CPU (elsewhere 64): half the in-chunk FLOPs, twice the loop steps


def check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens) -> None:
    """ValueError unless the shapes follow `chunk_gated_delta_rule`'s signature."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D] tensors")
    B, T, H, K = q.shape
    HKV = k.shape[2]
    if k.shape != (B, T, HKV, K) or v.shape[:3] != (B, T, HKV) or H % HKV:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(query heads must be a multiple of key/value heads)")
    for name, x in (("beta", beta), ("g", g)):
        if tuple(x.shape) != (B, T, HKV):
            raise ValueError(f"{name} must be [B, T, HKV] = {(B, T, HKV)}, got {tuple(x.shape)}")
    N = B
    if cu_seqlens is not None:
        c = cu_seqlens.tolist()
        if B != 1 or cu_seqlens.dim() != 1 or len(c) < 2 or c[0] != 0 or c[-1] != T or any(
                b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} over one packed row (B=1), got {c}")
        N = len(c) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, HKV, K, v.shape[-1]):
        raise ValueError(f"initial_state must be {(N, HKV, K, v.shape[-1])}, got {tuple(initial_state.shape)}")


def chunk_gated_delta_rule(
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale q_t S_t, chunked.

    Args:
        q: [B, T, H, K] queries; k: [B, T, HKV, K] keys (both usually L2-normalised: the
            recurrence is stable for ||k|| = 1 and beta in (0, 2)); query head h reads the
            state of KV head h // (H // HKV).
        v: [B, T, HKV, V] values.
        beta: [B, T, HKV] write strengths; g: [B, T, HKV] log decay (<= 0).
        scale: multiplies the output (None: K ** -0.5).
        initial_state: [N, HKV, K, V], N = B, or the number of sequences with cu_seqlens.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: [N + 1] cumulative lengths of packed sequences (B == 1); each sequence
            starts from its own initial state.
        chunk_size: tokens per chunk (any size is exact; None: 32 on the CPU, 64 elsewhere).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] fp32 (fp64 for fp64 inputs)
        or None. Differentiable w.r.t. q, k, v, beta, g and initial_state.
    """
    check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk_size = chunk_size or (_CPU_CHUNK if q.device.type == "cpu" else 64)
    if cu_seqlens is None:
        return _segments(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
    bounds = cu_seqlens.tolist()
    spans = list(zip(bounds, bounds[1:]))
    L = max(max(e - s for s, e in spans), 1)

    def rows(x):  # one zero-padded row per sequence: [N, L, ...]; padding leaves the state alone
        return torch.stack([torch.nn.functional.pad(x[0, s:e], (0, 0) * (x.dim() - 2) + (0, L - e + s))
                            for s, e in spans])

    o, final = _segments(*(rows(x) for x in (q, k, v, beta, g)), scale, initial_state, output_final_state, chunk_size)
    return torch.cat([o[n, : e - s] for n, (s, e) in enumerate(spans)])[None], final


def _segments(q, k, v, beta, g, scale, initial_state, output_final_state, C):
    """Long inputs in segments of whole chunks that carry the state, so the [C, C] temporaries
    (about C * (2 + G) floats per token and KV head) stay near `_SEGMENT_ELEMENTS` (on the
    CPU `_CPU_SEGMENT_ELEMENTS`, if smaller). Without autograd each segment's output is copied
    straight into the result; with it the segments are concatenated once at the end."""
    B, T, H, _ = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    per_token = B * HKV * C * (2 + H // HKV)
    budget = min(_SEGMENT_ELEMENTS, _CPU_SEGMENT_ELEMENTS) if q.device.type == "cpu" else _SEGMENT_ELEMENTS
    span = max(1, budget // (per_token * C)) * C
    inputs = (q, k, v, beta, g) + (() if initial_state is None else (initial_state,))
    record = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    outs, S, start = [], initial_state, 0
    for pieces in zip(*(x.split(span, dim=1) for x in (q, k, v, beta, g))):
        o, S = _chunk(*pieces, scale, S, C)
        if record:
            outs.append(o)
            continue
        if not outs:
            outs.append(o.new_empty(B, max(1, math.ceil(T / C)), *o.shape[2:]))
        outs[0][:, start:start + o.shape[1]] = o
        start += o.shape[1]
    o = (torch.cat(outs, dim=1) if record else outs[0]).view(B, -1, H, V)[:, :T]  # [B, NC, C, HKV, G, V]
    return o.to(q.dtype), (S if output_final_state else None)


def _chunk(q, k, v, beta, g, scale, initial_state, C):
    """One segment of B independent rows: o [B, NC, C, HKV, G, V] (a permuted view, padded to
    whole chunks) and the state after it, S [B, HKV, K, V] in the accumulation dtype."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G, BH = H // HKV, B * HKV
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    NC = max(1, math.ceil(T / C))
    pad = NC * C - T

    def chunks(x, dtype=acc):  # [B, T, HKV, D] -> contiguous [NC, B * HKV, C, D], zero-padded at the end
        x = x.to(dtype)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, NC, C, HKV, -1).permute(1, 0, 3, 2, 4).contiguous().view(NC, BH, C, x.shape[-1])

    qc = chunks(q.reshape(B, T, HKV, G * K)).view(NC, BH, C * G, K)  # rows t * G + i
    kc, vc = chunks(k), chunks(v)
    bc = chunks(beta.unsqueeze(-1)).view(NC, BH, C)
    b = chunks(g.unsqueeze(-1), torch.float64).view(NC, BH, C).cumsum(-1)  # [NC, BH, C]
    floor = math.log(torch.finfo(acc).tiny) / 2  # exp(floor) is normal, squared too, and far below eps
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).to(acc).tril_().clamp_min_(floor).exp().tril()  # [.., t, s]
    eb = b.to(acc).clamp(min=floor).exp()
    A = torch.matmul(kc * bc.unsqueeze(-1), kc.transpose(-1, -2)).mul_(decay)  # strictly lower part read
    Tb = torch.linalg.solve_triangular(A, torch.diag_embed(bc), upper=False, unitriangular=True)  # (I + A)^-1 beta
    U = torch.matmul(Tb, vc)  # [NC, BH, C, V]
    W = torch.matmul(Tb, kc * eb.unsqueeze(-1))  # [NC, BH, C, K]; u = U - W S_0
    scores = torch.matmul(qc, kc.transpose(-1, -2)).view(NC, BH, C, G, C).mul_(decay.unsqueeze(-2))
    kdT = (kc * (b[..., -1:] - b).to(acc).clamp_min_(floor).exp().unsqueeze(-1)).transpose(-1, -2)  # k_s exp(b_C - b_s)
    step = eb[..., -1, None, None]  # [NC, BH, 1, 1]
    S = initial_state.to(acc).reshape(BH, K, V) if initial_state is not None else q.new_zeros(BH, K, V, dtype=acc)
    carry = _carry_recorded if torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, beta, g, S)) else _carry_in_place
    S0, u, S = carry(U, W, kdT, step, S)
    o = torch.bmm(qc.view(NC * BH, C * G, K), S0.view(NC * BH, K, V)).view(NC, BH, C, G, V)
    o = o.mul_((eb * scale)[..., None, None]).view(NC * BH, C * G, V)
    o = o.baddbmm_(scores.view(NC * BH, C * G, C), u.view(NC * BH, C, V), alpha=scale)
    return o.view(NC, B, HKV, C, G, V).permute(1, 0, 3, 2, 4, 5), S.view(B, HKV, K, V)


def _carry_recorded(U, W, kdT, step, S):
    """The loop over chunks for autograd: every state is a new tensor.

    U [NC, BH, C, V], W [NC, BH, C, K], kdT [NC, BH, K, C], step [NC, BH, 1, 1], S [BH, K, V].
    Returns the state entering each chunk [NC, BH, K, V], the delta values u [NC, BH, C, V] and
    the state after the last chunk [BH, K, V]."""
    states, us = [], []
    for Uc, Wc, kdTc, sc in zip(U.unbind(0), W.unbind(0), kdT.unbind(0), step.unbind(0)):
        states.append(S)
        u = torch.baddbmm(Uc, Wc, S, alpha=-1)  # [BH, C, V]
        us.append(u)
        S = (S * sc).baddbmm_(kdTc, u)
    return torch.stack(states), torch.stack(us), S


def _carry_in_place(U, W, kdT, step, S):
    """`_carry_recorded` without autograd: u overwrites U, the states go into one buffer and a
    copy of S is updated in place (never the caller's initial state), so the loop allocates nothing."""
    S, S0 = S.clone(), S.new_empty(U.shape[0], *S.shape)
    for S0c, Uc, Wc, kdTc, sc in zip(S0.unbind(0), U.unbind(0), W.unbind(0), kdT.unbind(0), step.unbind(0)):
        S0c.copy_(S)
        Uc.baddbmm_(Wc, S, alpha=-1)
        S.mul_(sc).baddbmm_(kdTc, Uc)
    return S0, U, S
