"""RoPE on cached keys, undone or redone (Llama convention: x * cos + rotate_half(x) * sin).

A decode cache needs keys after RoPE for the softmax and, where a feature map reads keys
before RoPE, the keys before it as they enter a recurrent state. Rather than keeping both
copies, a cache keeps one and the first halves of each position's cos and sin ([B, T, D] for
[B, T, HKV, D] keys: the two halves of a Llama-convention rotation are equal), and undoes
(`undo_rope`) or redoes (`redo_rope`) the rotation.
"""
from __future__ import annotations

import torch


def rope_halves(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[cos | sin] first halves [B, T, D] of a rotation given as cos, sin [B, T, D]. Refuses a
    rotation whose two halves differ: undoing it would need all of it."""
    h = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])):
        raise ValueError("this model's rotary embedding has cos/sin halves that differ, which the LoLCATs decode "
                         "cache cannot undo from half of them; convert with linear_rope=True (feature maps after "
                         "RoPE) to decode it")
    return torch.cat([cos[..., :h], sin[..., :h]], dim=-1)


def undo_rope(k: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """The key before RoPE: k [B, L, HKV, D] rotated by `rope_halves` [B, L, D] (a rotation of
    each channel pair scaled by cos^2 + sin^2, as YaRN's attention factor scales it), undone in
    fp32 (fp64 stays); returns k's dtype. A position whose cos and sin are 0 (empty) stays 0."""
    acc = torch.promote_types(k.dtype, torch.float32)
    h = k.shape[-1] // 2
    c, s = halves.to(acc)[:, :, None, :h], halves.to(acc)[:, :, None, h:]
    k1, k2 = k.to(acc)[..., :h], k.to(acc)[..., h:]
    scale = c * c + s * s
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.cat([k1 * c + k2 * s, k2 * c - k1 * s], dim=-1) / scale.repeat(1, 1, 1, 2)).to(k.dtype)


def redo_rope(k: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """k [B, L, HKV, D] rotated by `rope_halves` [B, L, D] in k's dtype, with the operations of
    the mixers' `apply_rope` (so the same key and rotation give the same bits)."""
    cos = torch.cat([halves[..., : k.shape[-1] // 2]] * 2, dim=-1)[:, :, None].to(k.dtype)
    sin = torch.cat([halves[..., k.shape[-1] // 2:]] * 2, dim=-1)[:, :, None].to(k.dtype)
    k1, k2 = k.chunk(2, dim=-1)
    return k * cos + torch.cat((-k2, k1), dim=-1) * sin
