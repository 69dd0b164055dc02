"""Undoing RoPE on cached keys (`linearize.kernels.rope`)."""
import pytest
import torch

from linearize.kernels.rope import rope_halves, undo_rope


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
