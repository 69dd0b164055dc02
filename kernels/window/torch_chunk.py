"""Blocked sliding-window softmax attention in PyTorch (the CPU path).

Queries are cut into blocks of `block_size`. A query block only meets the keys of its own
block and of the `ceil((window - 1) / block_size)` blocks before it (a band), plus the
sink tokens that fell out of the band, so the cost is O(T * (window + block)) instead of
O(T^2). Blocks are processed in groups through one autograd Function that keeps only the
output and the log-sum-exp for backward and recomputes the scores group by group (memory
O(T * H * D)). Grouped-query heads share their key/value head in every matrix product;
k and v are never repeated.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..utils import check_softcap, check_window_inputs, sequence_spans, tracks_grad

_GROUP_BUDGET = 1 << 22  # score elements per group of query blocks


def chunk_window_attention(
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
    block_size: int = 64,
    need_lse: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sliding-window softmax attention with sink tokens and sink logits, blocked.

    Query t attends key s when s is valid, s <= t, and either t - s < window or s is one of
    the first `num_sink_tokens` valid keys of its sequence.

    Args:
        q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv]; H % HKV == 0.
        window: keys within the last `window` positions (query included); None = full causal.
        num_sink_tokens: the first valid keys of each sequence stay visible to every query.
        sink_logits: [H] or [H, M] logits added to each row's softmax denominator only.
        scale: score scale, default D ** -0.5.
        key_mask: [B, T] bool, False marks padding (never attended, not a sink).
        cu_seqlens: [N + 1] packed sequence bounds (B == 1); attention never crosses them.
        block_size: query rows per block.
        need_lse: False when the caller ignores lse: it may then come back as None, and
            inputs without padding take `sdpa_band_attention` (PyTorch's fused CPU attention
            kernel over the same band; packed sequences one at a time when they average at
            least a window in length).
        softcap: c > 0 caps each scaled score s to c * tanh(s / c) before masking and the
            softmax (Gemma-2; the gradient goes through tanh); None = no cap. Capped inputs
            always take the general blocked path.

    Returns:
        o: [B, T, H, Dv] in q's dtype (zeros for a query that sees nothing);
        lse: [B, T, H] fp32 (fp64 for fp64 inputs) log of the full softmax denominator,
        -inf when empty. Both are differentiable w.r.t. q, k, v and sink_logits.
    """
    check_window_inputs(q, k, v, window, num_sink_tokens, sink_logits, key_mask, cu_seqlens)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    check_softcap(softcap)
    if softcap is None and _fused_band_applies(q, k, v, window, sink_logits, key_mask, cu_seqlens, need_lse):
        return _fused_band(q, k, v, cu_seqlens, window=window, num_sink_tokens=num_sink_tokens,
                           sink_logits=sink_logits, scale=scale, need_lse=need_lse)
    band = _band_geometry(q.shape[1], window, num_sink_tokens, block_size, cu_seqlens)
    return _blocked_attention(q, k, v, band, sink_logits, scale, key_mask, cu_seqlens, softcap)


class _Band(NamedTuple):
    """Where the blocked path looks: NB query blocks of Bq rows; each meets the keys within W
    positions of it, found in its own block and the nb blocks before it (the key axis carries
    P = nb * Bq padding keys in front), and M sink tokens outside the band."""

    W: int
    M: int
    Bq: int
    NB: int
    nb: int
    P: int


def _band_geometry(T: int, window: int | None, num_sink_tokens: int, block_size: int, cu_seqlens) -> _Band:
    """The band of T tokens (or of the packed sequences of cu_seqlens [N + 1]); a window that
    covers the longest sequence is full causal attention (no sinks needed)."""
    horizon = T if cu_seqlens is None else max([e - s for _, s, e in sequence_spans(1, T, cu_seqlens)] + [1])
    full = window is None or window >= horizon
    W = max(horizon, 1) if full else window  # exact: same-sequence keys are never further back
    M = 0 if full else min(num_sink_tokens, T)
    NB = max(1, math.ceil(T / block_size))
    nb = min(math.ceil((W - 1) / block_size), NB - 1)
    return _Band(W, M, block_size, NB, nb, nb * block_size)


def _blocked_attention(q, k, v, band: _Band, sink_logits, scale, key_mask, cu_seqlens, softcap):
    """`chunk_window_attention`'s general path (arguments and outputs documented there): the
    inputs laid out in query blocks and a padded key axis, through `_BandAttention`."""
    B, T, H, D = q.shape
    HKV, Dv = k.shape[2], v.shape[-1]
    G = H // HKV
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Bq, NB, P = band.Bq, band.NB, band.P
    Tq = NB * Bq
    valid, seq_k, seq_q = _key_layout(B, T, P, Tq, key_mask, cu_seqlens, q.device)
    qa = F.pad(q.to(acc) * scale, (0, 0, 0, 0, 0, Tq - T)).reshape(B, NB, Bq, HKV, G, D)
    qa = qa.permute(0, 3, 1, 2, 4, 5).contiguous()  # [B, HKV, NB, Bq, G, D]
    kt = k.to(acc).transpose(1, 2)  # [B, HKV, T, D]
    vt = v.to(acc).transpose(1, 2)
    kp = F.pad(kt, (0, 0, P, Tq - T)).contiguous()
    vp = F.pad(vt, (0, 0, P, Tq - T)).contiguous()
    kx = vx = sidx = svalid = None
    if band.M > 0:
        kx, vx, sidx, svalid = _sink_keys(kt, vt, band.M, key_mask, cu_seqlens, NB, Bq)
    sinks = None if sink_logits is None else sink_logits.to(acc).reshape(HKV, G, -1)
    plan = _Plan(B, H, NB, Bq, band.W, band.nb, P, valid, seq_k, seq_q, sidx, svalid, cu_seqlens is not None,
                 softcap)
    o, lse = _BandAttention.apply(qa, kp, vp, kx, vx, sinks, plan)
    o = o.permute(0, 2, 3, 1, 4, 5).reshape(B, Tq, H, Dv)[:, :T]
    lse = lse.permute(0, 2, 3, 1, 4).reshape(B, Tq, H)[:, :T]
    return o.to(q.dtype), lse


def _fused_band(q, k, v, cu_seqlens, **band) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sdpa_band_attention` over the batch, or over each packed sequence in turn."""
    if cu_seqlens is None:
        return sdpa_band_attention(q, k, v, **band)
    parts = [sdpa_band_attention(q[:, s:e], k[:, s:e], v[:, s:e], **band)
             for _, s, e in sequence_spans(1, q.shape[1], cu_seqlens) if e > s]
    o = torch.cat([o for o, _ in parts], dim=1)
    return o, (torch.cat([lse for _, lse in parts], dim=1) if band["need_lse"] else None)


def _key_layout(B: int, T: int, P: int, Tq: int, key_mask, cu_seqlens, dev):
    """Key validity [B, P + Tq] and sequence ids on the padded key axis [P + Tq] and the query
    axis [Tq] (None without packed sequences; -1 / -2 on padding, so they never match)."""
    valid = torch.zeros(B, P + Tq, dtype=torch.bool, device=dev)
    valid[:, P : P + T] = True if key_mask is None else key_mask.bool()
    if cu_seqlens is None:
        return valid, None, None
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths.to(dev))
    seq_k = torch.full((P + Tq,), -1, dtype=torch.long, device=dev)
    seq_k[P : P + T] = ids
    seq_q = torch.full((Tq,), -2, dtype=torch.long, device=dev)
    seq_q[:T] = ids
    return valid, seq_k, seq_q


def _sink_keys(kt: torch.Tensor, vt: torch.Tensor, M: int, key_mask, cu_seqlens, NB: int, Bq: int):
    """The first M valid keys of each row (or of each packed sequence), which stay visible
    outside the band: (k, v, their positions, their validity).

    kt, vt: [B, HKV, T, D] / [B, HKV, T, Dv]. Per row: k [B, HKV, M, D], positions and validity
    [B, M]; packed sequences (B == 1) need them per query: k [B, HKV, NB, Bq, M, D], positions
    and validity [NB * Bq, M].
    """
    B, HKV, T, D = kt.shape
    Dv, dev, Tq = vt.shape[-1], kt.device, NB * Bq
    if cu_seqlens is None:
        if key_mask is None:
            sidx = torch.arange(M, device=dev).expand(B, M)
            svalid = torch.ones(B, M, dtype=torch.bool, device=dev)
        else:
            km = key_mask.bool()
            rank = km.long().cumsum(-1) - 1
            sel = km & (rank < M)
            bi, ti = sel.nonzero(as_tuple=True)
            sidx = torch.zeros(B, M, dtype=torch.long, device=dev)
            svalid = torch.zeros(B, M, dtype=torch.bool, device=dev)
            sidx[bi, rank[bi, ti]] = ti
            svalid[bi, rank[bi, ti]] = True
        rows = torch.arange(B, device=dev)[:, None]
        kx = kt.permute(0, 2, 1, 3)[rows, sidx].permute(0, 2, 1, 3)  # [B, HKV, M, D]
        vx = vt.permute(0, 2, 1, 3)[rows, sidx].permute(0, 2, 1, 3)
        return kx, vx, sidx, svalid
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(dev), lengths.to(dev))  # [T]
    lens = torch.repeat_interleave(lengths.to(dev), lengths.to(dev))
    m = torch.arange(M, device=dev)
    svalid = F.pad(m < lens[:, None], (0, 0, 0, Tq - T))  # [Tq, M]
    sidx = F.pad((starts[:, None] + m).clamp(max=T - 1), (0, 0, 0, Tq - T))
    kx = kt[:, :, sidx].reshape(B, HKV, NB, Bq, M, D)
    vx = vt[:, :, sidx].reshape(B, HKV, NB, Bq, M, Dv)
    return kx, vx, sidx, svalid


_FUSED_BLOCK = 32  # query rows per band block of the fused path


def _fused_band_applies(q, k, v, window, sink_logits, key_mask, cu_seqlens, need_lse) -> bool:
    """The fused path covers inputs without padding, and packed sequences that average at least
    a window in length (each is one call; many short ones are cheaper in one general pass); it
    returns lse only without autograd, and takes sink logits as constants (no gradient)."""
    if key_mask is not None or window is None or q.device.type != "cpu":
        return False
    if cu_seqlens is not None and q.shape[1] < window * (cu_seqlens.numel() - 1):
        return False
    if tracks_grad(q, k, v, sink_logits) and (need_lse or (sink_logits is not None and sink_logits.requires_grad)):
        return False
    return q.shape[1] > window  # shorter inputs are one dense block either way


def _band_bias(rows: int, keys: int, first_key: int, window: int, dtype, device) -> torch.Tensor:
    """[rows, keys] additive mask: 0 where key position first_key + j is in the window of query
    position i (0 <= i - (first_key + j) < window), -inf elsewhere."""
    d = torch.arange(rows, device=device)[:, None] - (first_key + torch.arange(keys, device=device))[None, :]
    return torch.zeros(rows, keys, dtype=dtype, device=device).masked_fill_((d < 0) | (d >= window), float("-inf"))


def _sdpa(q, k, v, bias, scale, need_lse):
    """o (and lse when asked) of softmax(q k^T scale + bias) v through PyTorch's fused CPU kernel.

    q [N, HKV, R, D], k [N, HKV, L, D], v [N, HKV, L, Dv], bias [R, L] or [HKV, R, L]."""
    bias = bias if bias.dim() == 2 else bias.unsqueeze(0)
    if q.shape[-1] == v.shape[-1] and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        # The fused kernel itself (it also returns lse); its autograd covers o only, which is
        # all the callers differentiate (lse under autograd takes the general path).
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                            scale=scale)
        return o, (lse if need_lse else None)
    if not need_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)  # the fused kernel's case not covered
    lse = s.logsumexp(-1)
    return torch.matmul(s.sub_(lse.unsqueeze(-1)).exp_(), v), lse


def sdpa_band_attention(q, k, v, *, window: int, num_sink_tokens: int = 0, sink_logits=None, scale=None,
                        need_lse: bool = False, block_size: int = _FUSED_BLOCK):
    """Sliding-window attention with sink tokens and (constant) sink logits through
    `scaled_dot_product_attention`, for inputs without padding or packing.

    With P = ceil((window - 1) / block_size) * block_size, the first E queries attend densely
    (a [E, E] mask), E >= window + P + sinks chosen so that T - E is a multiple of block_size
    (no padding); every later block of `block_size` queries from t0 on attends the band of keys
    [t0 - P, t0 + block_size), in which no sink token can lie, plus the sinks in front and
    the sink logits as zero keys whose additive bias is the logit. The band's keys are an
    unfolded view copied once; query heads of a group share it (rows ordered (t, g)).

    q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv]; sink_logits: [H] or [H, M'].
    Returns o [B, T, H, Dv] in q's dtype and lse [B, T, H] fp32 (need_lse, no autograd) or None.
    """
    B, T, H, D = q.shape
    HKV = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    M = min(num_sink_tokens, T)
    P = math.ceil((window - 1) / block_size) * block_size
    E = T - max(0, (T - (window + P + M)) // block_size) * block_size
    sl = None if sink_logits is None else sink_logits.detach().to(acc).reshape(HKV, H // HKV, -1)  # [HKV, G, M']
    qa = q.to(acc)
    kt = k.to(acc).transpose(1, 2)  # [B, HKV, T, D]
    vt = v.to(acc).transpose(1, 2)
    o, lse = _dense_head(qa[:, :E], kt[:, :, :E], vt[:, :, :E], window, M, sl, scale, need_lse)
    if E < T:
        o_tail, lse_tail = _band_tail(qa, kt, vt, E, window, M, P, block_size, sl, scale, need_lse)
        o = torch.cat([o, o_tail], dim=1)
        lse = torch.cat([lse, lse_tail], dim=1) if need_lse else None
    return o.to(q.dtype), lse


def _dense_head(qa, kt, vt, window: int, M: int, sl, scale: float, need_lse: bool):
    """The first E queries against the first E keys through one dense [E, E] mask: the window,
    the M sink tokens, and the sink logits sl [HKV, G, M'] (or None).

    qa [B, E, H, D], kt [B, HKV, E, D], vt [B, HKV, E, Dv] (the accumulation dtype). Returns o
    [B, E, H, Dv] and lse [B, E, H] (need_lse) or None."""
    B, E, H, D = qa.shape
    HKV, Dv = kt.shape[1], vt.shape[-1]
    G = H // HKV
    qh = qa.reshape(B, E, HKV, G, D).permute(0, 2, 1, 3, 4).reshape(B, HKV, E * G, D)
    bias = _band_bias(E, E, 0, window, qa.dtype, qa.device)
    if M:
        t = torch.arange(E, device=qa.device)[:, None]
        bias[:, :M].masked_fill_(t >= torch.arange(M, device=qa.device)[None, :], 0.0)
    bias = _sink_columns(bias.repeat_interleave(G, dim=0), sl, E)
    oh, lh = _sdpa(qh, _with_zero_keys(kt, sl), _with_zero_keys(vt, sl), bias, scale, need_lse)
    o = oh.view(B, HKV, E, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, E, H, Dv)
    lse = lh.view(B, HKV, E, G).permute(0, 2, 1, 3).reshape(B, E, H) if need_lse else None
    return o, lse


def _band_tail(qa, kt, vt, E: int, window: int, M: int, P: int, Bq: int, sl, scale: float, need_lse: bool):
    """Queries E.. in blocks of Bq, each against its band of P + Bq keys, the M sink tokens in
    front (outside every tail band) and the sink logits sl [HKV, G, M'] (or None).

    qa [B, T, H, D], kt [B, HKV, T, D], vt [B, HKV, T, Dv] (the accumulation dtype), T - E a
    multiple of Bq. Returns o [B, T - E, H, Dv] and lse [B, T - E, H] (need_lse) or None."""
    B, T, H, D = qa.shape
    HKV, Dv = kt.shape[1], vt.shape[-1]
    G = H // HKV
    NB = (T - E) // Bq
    qt = qa[:, E:].reshape(B, NB, Bq, HKV, G, D).permute(0, 1, 3, 2, 4, 5).reshape(B * NB, HKV, Bq * G, D)
    kb, vb = _tail_keys(kt, E, P, Bq, M), _tail_keys(vt, E, P, Bq, M)
    bias = _band_bias(Bq, P + Bq, -P, window, qa.dtype, qa.device)
    if M:
        bias = torch.cat([bias.new_zeros(Bq, M), bias], dim=1)  # the sinks lie outside every tail band
    bias = _sink_columns(bias.repeat_interleave(G, dim=0), sl, Bq)
    ot, lt = _sdpa(qt, _with_zero_keys(kb, sl), _with_zero_keys(vb, sl), bias, scale, need_lse)
    o = ot.view(B, NB, HKV, Bq, G, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, T - E, H, Dv)
    lse = lt.view(B, NB, HKV, Bq, G).permute(0, 1, 3, 2, 4).reshape(B, T - E, H) if need_lse else None
    return o, lse


def _tail_keys(x: torch.Tensor, E: int, P: int, Bq: int, M: int) -> torch.Tensor:
    """Keys (or values) x [B, HKV, T, D] of every tail block of Bq queries from E on:
    [B * NB, HKV, M + P + Bq, D], the M sink tokens, then the block's band [t0 - P, t0 + Bq)
    (an unfolded view, copied once)."""
    B, HKV, T, Dx = x.shape
    NB, L = (T - E) // Bq, P + Bq
    band = x[:, :, E - P:].unfold(2, L, Bq).permute(0, 2, 1, 4, 3).reshape(B * NB, HKV, L, Dx)
    if not M:
        return band
    return torch.cat([x[:, None, :, :M].expand(B, NB, HKV, M, Dx).reshape(B * NB, HKV, M, Dx), band], dim=2)


def _sink_columns(bias: torch.Tensor, sl, rows_t: int) -> torch.Tensor:
    """A bias [rows_t * G, L] with the sink-logit columns of sl [HKV, G, M'] in front,
    [HKV, rows_t * G, M' + L]; the bias itself when sl is None."""
    if sl is None:
        return bias
    HKV, G, Ms = sl.shape
    logit = sl[:, None].expand(HKV, rows_t, G, Ms).reshape(HKV, rows_t * G, Ms)
    return torch.cat([logit, bias.expand(HKV, *bias.shape)], dim=-1)


def _with_zero_keys(x: torch.Tensor, sl) -> torch.Tensor:
    """[..., L, D] -> [..., M' + L, D] with one zero key/value in front per sink logit of sl
    [HKV, G, M'] (x itself when sl is None): its score is then the logit, its value nothing."""
    Ms = 0 if sl is None else sl.shape[-1]
    return x if Ms == 0 else torch.cat([x.new_zeros(*x.shape[:-2], Ms, x.shape[-1]), x], dim=-2)


class _Plan:
    """Static description of the band: query-block groups and their masks."""

    def __init__(self, B, H, NB, Bq, W, nb, P, valid, seq_k, seq_q, sidx, svalid, per_row, softcap=None):
        self.Bq, self.W, self.nb, self.P = Bq, W, nb, P
        self.softcap = softcap
        self.valid, self.seq_k, self.seq_q = valid, seq_k, seq_q
        self.sidx, self.svalid, self.per_row = sidx, svalid, per_row
        self.groups = []
        i0 = 0
        while i0 < NB:
            n = max(1, _GROUP_BUDGET // (B * H * Bq * (nb + 1) * Bq))
            i1 = min(NB, i0 + n)
            self.groups.append((i0, i1, min(nb, i1 - 1)))
            i0 = i1

    def band(self, i0, i1, nbg):
        """Padded key indices [n, L] and the mask [B or 1, n, Bq, L] of query blocks i0..i1."""
        Bq, dev = self.Bq, self.valid.device
        L = (nbg + 1) * Bq
        blocks = torch.arange(i0, i1, device=dev)
        idx = ((blocks - nbg) * Bq + self.P)[:, None] + torch.arange(L, device=dev)  # [n, L]
        s = (idx - self.P)[:, None, :]
        t = (blocks * Bq)[:, None] + torch.arange(Bq, device=dev)  # [n, Bq]
        d = t[:, :, None] - s
        mask = ((d >= 0) & (d < self.W)).unsqueeze(0) & self.valid[:, idx].unsqueeze(2)
        if self.seq_k is not None:
            mask = mask & (self.seq_k[idx][:, None, :] == self.seq_q[t][:, :, None])
        return idx, mask

    def extra(self, i0, i1):
        """Mask [B, n, Bq, M] of the sink keys that lie outside the window."""
        Bq, dev = self.Bq, self.valid.device
        t = torch.arange(i0 * Bq, i1 * Bq, device=dev)
        if self.per_row:
            d = t[:, None] - self.sidx[t]
            ok = self.svalid[t] & (d >= self.W)
            return ok.view(1, i1 - i0, Bq, -1)
        d = t[None, :, None] - self.sidx[:, None, :]  # [B, n * Bq, M]
        ok = self.svalid[:, None, :] & (d >= self.W)
        return ok.view(ok.shape[0], i1 - i0, Bq, -1)


def _group_scores(plan, i0, i1, nbg, qa, kp, kx):
    """Masked scores of a group: band [B, HKV, n, Bq, G, L], sinks outside it
    [B, HKV, n, Bq, G, M] (or None), and the band's padded key indices [n, L]."""
    B, HKV, _, Bq, G, D = qa.shape
    n = i1 - i0
    idx, mask = plan.band(i0, i1, nbg)
    L = idx.shape[1]
    qg = qa[:, :, i0:i1].reshape(B, HKV, n, Bq * G, D)
    kb = kp.index_select(2, idx.flatten()).view(B, HKV, n, L, D)
    s = _cap_(torch.matmul(qg, kb.transpose(-1, -2)).view(B, HKV, n, Bq, G, L), plan.softcap)
    s.masked_fill_(~mask[:, None, :, :, None, :], float("-inf"))
    sx = None
    if kx is not None:
        if plan.per_row:
            sx = torch.matmul(qa[:, :, i0:i1], kx[:, :, i0:i1].transpose(-1, -2))  # [B, HKV, n, Bq, G, M]
        else:
            sx = torch.matmul(qg, kx.unsqueeze(2).transpose(-1, -2)).view(B, HKV, n, Bq, G, -1)
        sx = _cap_(sx, plan.softcap)
        sx.masked_fill_(~plan.extra(i0, i1)[:, None, :, :, None, :], float("-inf"))
    return s, sx, idx, kb


def _cap_(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c * tanh(s / c) in place (s itself when softcap is None)."""
    return s if softcap is None else s.div_(softcap).tanh_().mul_(softcap)


def _cap_slope(s: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    """d capped / d raw = 1 - (s / c)^2 from capped, masked scores s (1 where s = -inf); None
    without a cap."""
    if softcap is None:
        return None
    t = (s / softcap).nan_to_num_(0.0, 0.0, 0.0)
    return t.mul_(t).neg_().add_(1.0)


class _BandAttention(torch.autograd.Function):
    """Softmax attention over a key band, out-of-band sink keys and sink logits.

    qa: [B, HKV, NB, Bq, G, D] (pre-scaled); kp, vp: [B, HKV, P + NB * Bq, D or Dv];
    kx, vx: [B, HKV, M, D] or [B, HKV, NB, Bq, M, D] or None; sinks: [HKV, G, M'] or None.
    Returns o [B, HKV, NB, Bq, G, Dv] and lse [B, HKV, NB, Bq, G].
    """

    @staticmethod
    def forward(ctx, qa, kp, vp, kx, vx, sinks, plan):
        B, HKV, NB, Bq, G, D = qa.shape
        Dv = vp.shape[-1]
        o = qa.new_empty(B, HKV, NB, Bq, G, Dv)
        lse = qa.new_empty(B, HKV, NB, Bq, G)
        for i0, i1, nbg in plan.groups:
            n = i1 - i0
            s, sx, idx, _ = _group_scores(plan, i0, i1, nbg, qa, kp, kx)
            m = s.amax(-1)
            if sx is not None:
                m = torch.maximum(m, sx.amax(-1))
            if sinks is not None:
                m = torch.maximum(m, sinks.amax(-1)[:, None, None, :])
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = s.sub_(m.unsqueeze(-1)).exp_()
            denom = p.sum(-1)
            vb = vp.index_select(2, idx.flatten()).view(B, HKV, n, -1, Dv)
            og = torch.matmul(p.view(B, HKV, n, Bq * G, -1), vb).view(B, HKV, n, Bq, G, Dv)
            if sx is not None:
                px = sx.sub_(m.unsqueeze(-1)).exp_()
                denom = denom + px.sum(-1)
                og = og + _extra_values(plan, px, vx, i0, i1)
            if sinks is not None:
                denom = denom + (sinks[:, None, None] - m.unsqueeze(-1)).exp().sum(-1)
            lse[:, :, i0:i1] = m + denom.log()
            o[:, :, i0:i1] = og / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
        ctx.plan = plan
        ctx.save_for_backward(qa, kp, vp, kx, vx, sinks, o, lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        qa, kp, vp, kx, vx, sinks, o, lse = ctx.saved_tensors
        plan = ctx.plan
        B, HKV, NB, Bq, G, D = qa.shape
        Dv = vp.shape[-1]
        dqa = torch.zeros_like(qa)
        dkp = torch.zeros_like(kp)
        dvp = torch.zeros_like(vp)
        dkx = None if kx is None else torch.zeros_like(kx)
        dvx = None if vx is None else torch.zeros_like(vx)
        dsinks = None if sinks is None else torch.zeros_like(sinks)
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        for i0, i1, nbg in plan.groups:
            n = i1 - i0
            s, sx, idx, kb = _group_scores(plan, i0, i1, nbg, qa, kp, kx)
            slope, slope_x = _cap_slope(s, plan.softcap), None if sx is None else _cap_slope(sx, plan.softcap)
            L = idx.shape[1]
            ls = lse_safe[:, :, i0:i1].unsqueeze(-1)
            p = s.sub_(ls).exp_().view(B, HKV, n, Bq * G, L)
            dog = do[:, :, i0:i1]
            # d lse / d score = p, so ds = p * (dp - delta + dlse) with delta = do . o
            shift = ((dog * o[:, :, i0:i1]).sum(-1) - dlse[:, :, i0:i1]).unsqueeze(-1)  # [B, HKV, n, Bq, G, 1]
            dog = dog.reshape(B, HKV, n, Bq * G, Dv)
            vb = vp.index_select(2, idx.flatten()).view(B, HKV, n, L, Dv)
            ds = torch.matmul(dog, vb.transpose(-1, -2)).view(B, HKV, n, Bq, G, L).sub_(shift).mul_(p.view(B, HKV, n, Bq, G, L))
            if slope is not None:
                ds.mul_(slope)
            ds = ds.view(B, HKV, n, Bq * G, L)
            qg = qa[:, :, i0:i1].reshape(B, HKV, n, Bq * G, D)
            dq = torch.matmul(ds, kb)
            dkp.index_add_(2, idx.flatten(), torch.matmul(ds.transpose(-1, -2), qg).view(B, HKV, n * L, D))
            dvp.index_add_(2, idx.flatten(), torch.matmul(p.transpose(-1, -2), dog).view(B, HKV, n * L, Dv))
            if sx is not None:
                px = sx.sub_(ls).exp_()  # [B, HKV, n, Bq, G, M]
                if plan.per_row:
                    dsx = torch.matmul(do[:, :, i0:i1], vx[:, :, i0:i1].transpose(-1, -2)).sub_(shift).mul_(px)
                    if slope_x is not None:
                        dsx.mul_(slope_x)
                    dq = dq + torch.matmul(dsx, kx[:, :, i0:i1]).view(B, HKV, n, Bq * G, D)
                    dkx[:, :, i0:i1] = torch.matmul(dsx.transpose(-1, -2), qa[:, :, i0:i1])
                    dvx[:, :, i0:i1] = torch.matmul(px.transpose(-1, -2), do[:, :, i0:i1])
                else:
                    Mx = kx.shape[2]
                    dsx = torch.matmul(dog, vx.unsqueeze(2).transpose(-1, -2)).view(B, HKV, n, Bq, G, Mx)
                    dsx = dsx.sub_(shift).mul_(px)
                    if slope_x is not None:
                        dsx.mul_(slope_x)
                    dsx = dsx.view(B, HKV, n * Bq * G, Mx)
                    dq = dq + torch.matmul(dsx, kx).view(B, HKV, n, Bq * G, D)
                    dkx += torch.matmul(dsx.transpose(-1, -2), qg.reshape(B, HKV, n * Bq * G, D))
                    dvx += torch.matmul(px.view(B, HKV, n * Bq * G, Mx).transpose(-1, -2),
                                        dog.reshape(B, HKV, n * Bq * G, Dv))
            if sinks is not None:
                psink = (sinks[:, None, None] - ls).exp()  # [B, HKV, n, Bq, G, M']
                dsinks += (psink * shift.neg()).sum(dim=(0, 2, 3))
            dqa[:, :, i0:i1] = dq.view(B, HKV, n, Bq, G, D)
        return dqa, dkp, dvp, dkx, dvx, dsinks, None


def _extra_values(plan, px, vx, i0, i1):
    """Contribution of the out-of-band sink keys, [B, HKV, n, Bq, G, Dv]."""
    if plan.per_row:
        return torch.matmul(px, vx[:, :, i0:i1])
    B, HKV, n, Bq, G, Mx = px.shape
    return torch.matmul(px.reshape(B, HKV, n * Bq * G, Mx), vx).view(B, HKV, n, Bq, G, -1)
