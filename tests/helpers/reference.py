"""Pieces of the fp64 layer references that the method tests write from the papers' equations
(kept here, not imported from linearize, so a reference shares no code with what it checks)."""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE on x [T, heads, D] at positions 0..T-1 (fp64)."""
    Tn, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(Tn, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin
