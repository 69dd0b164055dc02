"""Feature maps phi applied to queries and keys before the linear recurrence."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class SoftmaxFeatureMap(nn.Module):
    """Liger's parameter-free map: softmax over the head dimension. [B, T, H, D] -> same."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.to(_acc(x)), dim=-1).to(x.dtype)


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h) ++ softmax(-x W_h)] with a learned W_h per head.

    x: [B, T, H, D] -> [B, T, H, 2 * feature_dim]. W is initialised to the identity
    (truncated or zero-padded when feature_dim != D), the published Hedgehog/LoLCATs start:
    the map then ranks channels exactly as the raw key or query does.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        feature_dim = feature_dim or head_dim
        self.out_dim = 2 * feature_dim
        eye = torch.eye(head_dim, feature_dim)
        self.weight = nn.Parameter(eye.unsqueeze(0).repeat(num_heads, 1, 1))  # [H, D, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthd,hdf->bthf", x.to(_acc(x)), self.weight.to(_acc(x)))
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).to(x.dtype)


class L2NormFeatureMap(nn.Module):
    """The delta rule's map: x / ||x|| per head (no parameters). [B, T, H, D] -> same."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.to(_acc(x)), dim=-1).to(x.dtype)


class TaylorFeatureMap(nn.Module):
    """Based's 2nd-order Taylor map of exp on a learned per-head projection y = x W_h:

        phi(y) = [1, y / d^(1/4), vec(y y^T) / (sqrt(2) sqrt(d))],  phi(q).phi(k) = 1 + s + s^2 / 2

    with s = q W . k W / sqrt(d), d the projection width (16 by default, Based's feature_dim).
    x: [B, T, H, D] -> [B, T, H, 1 + d + d^2] (273 features for d = 16). W [H, D, d] starts as the
    truncated identity (the first d channels), as the Hedgehog map does; Based learns its q, k
    projections from scratch, a converted model trains W in stage 1. phi(q).phi(k) >= 1/2, so the
    normalizer never vanishes.
    """

    DEFAULT_DIM = 16

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        d = feature_dim or self.DEFAULT_DIM
        self.feature_dim = d
        self.out_dim = 1 + d + d * d
        self.weight = nn.Parameter(torch.eye(head_dim, d).unsqueeze(0).repeat(num_heads, 1, 1))  # [H, D, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bthd,hdf->bthf", x.to(_acc(x)), self.weight.to(_acc(x)))
        d = self.feature_dim
        second = (y.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * d)
        return torch.cat([torch.ones_like(y[..., :1]), y / d ** 0.25, second], dim=-1).to(x.dtype)


def _acc(x: torch.Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 inputs), fp64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def build_feature_map(kind: str, num_heads: int, head_dim: int, feature_dim: int | None) -> nn.Module:
    if kind == "softmax":
        return SoftmaxFeatureMap(head_dim)
    if kind == "hedgehog":
        return HedgehogFeatureMap(num_heads, head_dim, feature_dim)
    if kind == "l2":
        return L2NormFeatureMap(head_dim)
    if kind == "taylor":
        return TaylorFeatureMap(num_heads, head_dim, feature_dim)
    raise ValueError(f"no feature map {kind!r}")
