"""RoPE (Llama convention: x * cos + rotate_half(x) * sin), as the mixers apply it and as a
decode cache undoes or redoes it on cached keys.

A decode cache needs keys after RoPE for the softmax and, where a feature map reads keys
before RoPE, the keys before it as they enter a recurrent state. Rather than keeping both
copies, a cache keeps one and the first halves of each position's cos and sin ([B, T, D] for
[B, T, HKV, D] keys: the two halves of a Llama-convention rotation are equal), and undoes
(`undo_rope`) or redoes (`redo_rope`) the rotation.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] for x = [x1, x2] split on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] -> rotated x (Llama convention), in x's dtype."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


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
    """k [B, L, HKV, D] rotated by `rope_halves` [B, L, D] with `apply_rope` (so the same key
    and rotation give the same bits as the mixers' forward)."""
    h = k.shape[-1] // 2
    return apply_rope(k, torch.cat([halves[..., :h]] * 2, dim=-1), torch.cat([halves[..., h:]] * 2, dim=-1))
