"""Head-level hybrid (DuoAttention-style): a few KV heads of a linearized layer keep exact
softmax attention over every past token.

DuoAttention (Xiao et al. 2024, arXiv 2410.10819) keeps full attention and a full KV cache
only in a few "retrieval heads" and makes the others streaming (window + sinks). Here the
other heads stay whatever the conversion makes them (window + sinks + linear recurrence, LoLA's
sparse cache, ...). `LinearizeConfig.full_attention_heads` names the kept KV heads per layer;
with GQA a kept KV head keeps all the query heads of its group.

The mixer computes its hybrid for every head as before and then replaces the kept heads'
outputs by `exact_attention` (in `linearize.kernels.window.full`: the teacher's math, scaled
dot product of RoPE'd q and k, causal, softmax over all valid keys), before o_proj. The kept
heads' hybrid outputs are thus computed and discarded (their constant-size recurrent state is
kept too), which costs compute but leaves the other heads bit for bit as without the option.
Decoding keeps the kept heads' post-RoPE keys and values, growing
(`LinearizedLayerCache.full_attention_kv`).
"""
from __future__ import annotations

import torch

from ..kernels.window.full import exact_attention


def query_heads(kv_heads: list[int], group: int) -> list[int]:
    """Query-head indices of the given KV heads (GQA group size `group` = H / HKV)."""
    return [h * group + j for h in kv_heads for j in range(group)]


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
