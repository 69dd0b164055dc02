"""The chunked gated delta rule in PyTorch (the CPU path), in the WY / UT form.

Per KV head, with S_0 the state entering a chunk and b_t the cumulative log gate inside it
(b_t <= b_s <= 0 for s <= t), the recurrence S_t = exp(g_t) S_{t-1} + k_t u_t^T has the
delta values

    u_s = beta_s (v_s - exp(g_s) k_s^T S_{s-1})
        = beta_s v_s - beta_s exp(b_s) k_s^T S_0 - sum_{r < s} beta_s exp(b_s - b_r) (k_s . k_r) u_r,

a unit lower-triangular system (I + A) u = beta V - beta exp(b) K S_0 with
A[s, r] = beta_s exp(b_s - b_r) k_s . k_r (r < s). Solving it once per chunk for both
right-hand sides (the UT transform T = (I + A)^-1, applied by a triangular solve) gives
U = T beta V and W = T beta exp(b) K, so u = U - W S_0 costs one matmul once S_0 is known:

    o_t = scale (exp(b_t) q_t S_0 + sum_{s <= t} exp(b_t - b_s) (q_t . k_s) u_s)
    S_C = exp(b_C) S_0 + sum_s exp(b_C - b_s) k_s u_s^T

Everything but the short loop over chunks (u, o and S per chunk) runs for all chunks at once;
long inputs go in segments of whole chunks that carry the state, so temporaries stay bounded.
Cumulative gates are summed in fp64 and every decay is exp of a difference <= 0 taken in
fp64, masked before the exponential. Gradients flow through autograd (the triangular solve
included).
"""
from __future__ import annotations

import math

import torch

_SEGMENT_ELEMENTS = 1 << 24  # elements of the per-chunk [C, C] temporaries per segment of a long input


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
    chunk_size: int = 64,
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
        chunk_size: tokens per chunk (any size is exact).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [N, HKV, K, V] fp32 (fp64 for fp64 inputs)
        or None. Differentiable w.r.t. q, k, v, beta, g and initial_state.
    """
    check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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
    (about C * (2 + G) floats per token and KV head) stay near `_SEGMENT_ELEMENTS`."""
    B, T, H, _ = q.shape
    per_token = B * k.shape[2] * C * (2 + H // k.shape[2])
    span = max(1, _SEGMENT_ELEMENTS // (per_token * C)) * C
    if T <= span:
        return _chunk(q, k, v, beta, g, scale, initial_state, output_final_state, C)
    outs, state = [], initial_state
    for pieces in zip(*(x.split(span, dim=1) for x in (q, k, v, beta, g))):
        o, state = _chunk(*pieces, scale, state, True, C)
        outs.append(o)
    return torch.cat(outs, dim=1), (state if output_final_state else None)


def _chunk(q, k, v, beta, g, scale, initial_state, output_final_state, C):
    """`chunk_gated_delta_rule` on B independent rows."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], v.shape[-1]
    G = H // HKV
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    NC = max(1, math.ceil(T / C))
    pad = NC * C - T

    def chunks(x, dtype=acc):  # [B, T, HKV, ...] -> contiguous [B, HKV, NC, C, ...], zero-padded at the end
        x = torch.nn.functional.pad(x.to(dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.transpose(1, 2).contiguous()
        return x.view(B, HKV, NC, C, *x.shape[3:])

    qc = chunks(q.view(B, T, HKV, G, K)).view(B, HKV, NC, C * G, K)
    kc, vc, bc = chunks(k), chunks(v), chunks(beta)
    b = chunks(g, torch.float64).cumsum(-1)  # [B, HKV, NC, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).to(acc).masked_fill(~causal, float("-inf")).exp()  # [.., t, s]
    eb = b.exp().to(acc)
    A = (torch.matmul(kc, kc.transpose(-1, -2)) * decay * bc.unsqueeze(-1)).tril(-1)
    eye = torch.eye(C, dtype=acc, device=q.device)
    Tm = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)  # (I + A)^-1
    U = torch.matmul(Tm, vc * bc.unsqueeze(-1))  # [.., C, V]
    W = torch.matmul(Tm, kc * (bc * eb).unsqueeze(-1))  # [.., C, K]; u = U - W S_0
    scores = torch.matmul(qc, kc.transpose(-1, -2)).view(B, HKV, NC, C, G, C).mul_(decay.unsqueeze(-2) * scale)
    scores = scores.view(B, HKV, NC, C * G, C)
    qg = qc * (eb * scale).repeat_interleave(G, dim=-1).unsqueeze(-1)  # scale q_t exp(b_t)
    kdT = (kc * (b[..., -1:] - b).exp().to(acc).unsqueeze(-1)).transpose(-1, -2).contiguous()  # k_s exp(b_C - b_s)
    step = eb[..., -1, None, None]  # [B, HKV, NC, 1, 1]
    S = (initial_state.to(acc) if initial_state is not None
         else torch.zeros(B, HKV, K, V, dtype=acc, device=q.device))
    outs = []
    for c in range(NC):
        u = U[:, :, c] - torch.matmul(W[:, :, c], S)  # [B, HKV, C, V]
        outs.append(torch.matmul(qg[:, :, c], S) + torch.matmul(scores[:, :, c], u))
        S = torch.addcmul(torch.matmul(kdT[:, :, c], u), S, step[:, :, c])
    o = torch.stack(outs, dim=2).view(B, HKV, NC * C, G, V).transpose(1, 2).reshape(B, NC * C, H, V)[:, :T]
    return o.to(q.dtype), (S if output_final_state else None)
