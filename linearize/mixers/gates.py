"""Forget gates of the recurrence, all returned as log decay (<= 0) per KV head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Learned gates start with a decay of exp(-1/1000) per token: the state remembers about a
# thousand tokens, the closest a decaying state gets to softmax attention's full memory,
# while the gate projection (zero at start) learns where to forget.
INITIAL_LOG_DECAY = -1e-3


class LigerGate(nn.Module):
    """Liger's parameter-free gate: log a_t = logsigmoid(k_t) / normalizer, per channel.

    k: [B, T, HKV, D] raw keys -> [B, T, HKV, D * repeat] (repeated to the feature width).
    """

    def __init__(self, normalizer: float, repeat: int = 1):
        super().__init__()
        self.normalizer = normalizer
        self.repeat = repeat

    def forward(self, hidden: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        g = F.logsigmoid(k.float()) / self.normalizer
        return g.repeat(1, 1, 1, self.repeat) if self.repeat > 1 else g


class ScalarGate(nn.Module):
    """Lizard's gate: log gamma_t = logsigmoid(x W + b), one scalar per token and KV head.

    hidden: [B, T, C] -> [B, T, HKV].
    """

    def __init__(self, hidden_size: int, num_kv_heads: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_kv_heads)
        nn.init.zeros_(self.proj.weight)
        # logsigmoid(b) = INITIAL_LOG_DECAY  <=>  b = -log(expm1(-INITIAL_LOG_DECAY))
        nn.init.constant_(self.proj.bias, -math.log(math.expm1(-INITIAL_LOG_DECAY)))

    def forward(self, hidden: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.proj(hidden).float())


class Mamba2Gate(nn.Module):
    """Mamba2-style gate: log a_t = -exp(A) * softplus(x W_dt + dt_bias), per token and KV head.

    hidden: [B, T, C] -> [B, T, HKV].
    """

    def __init__(self, hidden_size: int, num_kv_heads: int):
        super().__init__()
        self.dt_proj = nn.Linear(hidden_size, num_kv_heads)
        self.A_log = nn.Parameter(torch.zeros(num_kv_heads))
        nn.init.zeros_(self.dt_proj.weight)
        # softplus(dt_bias) = -INITIAL_LOG_DECAY with A = 1
        nn.init.constant_(self.dt_proj.bias, math.log(math.expm1(-INITIAL_LOG_DECAY)))

    def forward(self, hidden: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(self.dt_proj(hidden).float())
        return -torch.exp(self.A_log.float()) * dt


def build_gate(kind: str, *, hidden_size: int, num_kv_heads: int, normalizer: float, repeat: int) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "liger":
        return LigerGate(normalizer, repeat)
    if kind == "scalar":
        return ScalarGate(hidden_size, num_kv_heads)
    if kind == "mamba2":
        return Mamba2Gate(hidden_size, num_kv_heads)
    raise ValueError(f"no gate {kind!r}")
