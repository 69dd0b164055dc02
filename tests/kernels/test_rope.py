"""Undoing RoPE on cached keys (`linearize.kernels.rope`)."""
import pytest
import torch

from linearize.kernels.rope import apply_rope, redo_rope, rope_halves, undo_rope
from linearize.mixers.context import ForwardContext


def rotate(k, angles, factor):
    """Channel pair (i, i + D/2) of k [B, T, HKV, D] turned by angles [B, T, D/2], scaled by factor."""
    c, s = angles.cos()[:, :, None] * factor, angles.sin()[:, :, None] * factor
    k1, k2 = k.chunk(2, dim=-1)
    return torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1)


def test_undo_rope_inverts_the_rotation_in_fp64():
    """`undo_rope` recovers the key before the rotation for any positions, including a scaled
    one (YaRN's attention factor multiplies cos and sin); Llama's cos/sin repeat the angles."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 7, 3, 16, generator=gen, dtype=torch.float64)
    angles = torch.rand(2, 7, 8, generator=gen, dtype=torch.float64) * 100
    emb = torch.cat([angles, angles], dim=-1)
    for factor in (1.0, 1.3):
        cos, sin = emb.cos() * factor, emb.sin() * factor
        back = undo_rope(rotate(k, angles, factor), rope_halves(cos, sin))
        assert ((back - k).norm() / k.norm()).item() < 1e-12
    with pytest.raises(ValueError, match="linear_rope=True"):
        rope_halves(torch.randn(1, 2, 16), torch.randn(1, 2, 16))


def test_redo_rope_is_apply_rope_bit_for_bit():
    """`redo_rope` from the halves gives the forward's own rotated keys, bit for bit, in fp32."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 5, 3, 16, generator=gen)
    angles = torch.rand(2, 5, 8, generator=gen) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    assert torch.equal(redo_rope(k, rope_halves(cos, sin)), apply_rope(k, cos, sin))


def test_forward_context_checks_a_rotation_once_per_forward():
    """Every layer handed the same cos/sin gets the same halves object; a new forward, or
    another rotation (Gemma-3's local layers), gets its own, and unequal halves still fail."""
    ctx = ForwardContext()
    cos, sin = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    first = ctx.rope_halves(cos, sin)
    assert ctx.rope_halves(cos, sin) is first
    other = ctx.rope_halves(cos.clone(), sin)
    assert other is not first and torch.equal(other, first)
    ctx.record(None, (), {})
    assert ctx.rope_halves(cos, sin) is not first
    with pytest.raises(ValueError, match="linear_rope=True"):
        ctx.rope_halves(torch.randn(1, 2, 16), torch.randn(1, 2, 16))
