"""Head-level hybrid (DuoAttention-style): a few KV heads of a linearized layer keep exact
softmax attention over every past token.

DuoAttention (Xiao et al. 2024, arXiv 2410.10819) keeps full attention and a full KV cache
only in a few "retrieval heads" and makes the others streaming (window + sinks). Here the
other heads stay whatever the conversion makes them (window + sinks + linear recurrence, LoLA's
sparse cache, ...). `LinearizeConfig.full_attention_heads` names the kept KV heads per layer;
with GQA a kept KV head keeps all the query heads of its group.

The mixer computes its hybrid for every head as before and then replaces the kept heads'
outputs by `exact_attention` (the teacher's math: scaled dot product of RoPE'd q and k,
causal, softmax over all valid keys), before o_proj. The kept heads' hybrid outputs are thus
computed and discarded (their constant-size recurrent state is kept too), which costs compute
but leaves the other heads bit for bit as without the option. Decoding keeps the kept heads'
post-RoPE keys and values, growing (`LinearizedLayerCache.full_attention_kv`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def query_heads(kv_heads: list[int], group: int) -> list[int]:
    """Query-head indices of the given KV heads (GQA group size `group` = H / HKV)."""
    return [h * group + j for h in kv_heads for j in range(group)]


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, *,
                    scale: float, cu_seqlens: torch.Tensor | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Causal softmax attention of the T new queries over L >= T keys (the past, then the T
    new tokens).

    q [B, T, Hq, D]; k, v [B, L, Hk, D] with Hq a multiple of Hk (query head i reads KV head
    i // (Hq / Hk)); key_valid [B, L] bool (False: padding, never attended) or None; cu_seqlens
    [N + 1] packed-sequence bounds (no past, B = 1) or None; softcap: Gemma-2's c tanh(s / c).
    A query sees itself even when padded, so no row is empty. Returns o [B, T, Hq, D] in q's dtype.
    """
    B, T, Hq, _ = q.shape
    L = k.shape[1]
    if Hq != k.shape[2]:
        k = k.repeat_interleave(Hq // k.shape[2], dim=2)
        v = v.repeat_interleave(Hq // v.shape[2], dim=2)
    qpos = torch.arange(L - T, L, device=q.device)[:, None]
    kpos = torch.arange(L, device=q.device)[None, :]
    allowed = (kpos <= qpos).expand(B, T, L)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    if cu_seqlens is not None:
        seg = torch.zeros(L, dtype=torch.long, device=q.device)
        seg[cu_seqlens[1:-1]] = 1
        seg = seg.cumsum(0)
        allowed = allowed & (seg[L - T:][:, None] == seg[None, :])
    allowed = allowed | (kpos == qpos)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap is None:
        o = F.scaled_dot_product_attention(qh, kh.to(q.dtype), vh.to(q.dtype), attn_mask=allowed[:, None], scale=scale)
    else:
        s = torch.matmul(qh, kh.to(q.dtype).transpose(-1, -2)) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        o = torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), vh.to(q.dtype))
    return o.transpose(1, 2)


def with_full_heads(mixer, o: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, state) -> torch.Tensor:
    """The hybrid's output o [B, T, H, V] with the query heads of `mixer.full_heads` (KV-head
    indices) replaced by `exact_attention` over every key; q_rot [B, T, H, D], k_rot and v
    [B, T, HKV, D]. With a decode state the kept heads' keys/values are appended to it first."""
    kv = mixer.full_heads
    group = mixer.num_heads // mixer.num_kv_heads
    qidx = torch.tensor(query_heads(kv, group), device=o.device)
    kidx = torch.tensor(kv, device=o.device)
    k_new, v_new = k_rot.index_select(2, kidx), v.index_select(2, kidx)
    if state is not None:
        if cu_seqlens is not None:
            raise ValueError("packed sequences (cu_seqlens) cannot carry a decode state; decode one row per sequence")
        keys, values, valid = state.full_attention_kv(k_new, v_new, key_mask)
    else:
        keys, values, valid = k_new, v_new, key_mask
    full = exact_attention(q_rot.index_select(2, qidx), keys, values, valid, scale=mixer.scaling,
                           cu_seqlens=cu_seqlens, softcap=mixer.softcap)
    return o.index_copy(2, qidx, full.to(o.dtype))
