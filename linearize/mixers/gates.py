"""Forget gates of the recurrence, all returned as log decay (<= 0) per KV head (Lightning's per state head)."""
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


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's per-head slopes for n heads (Press et al.): 2^(-8 i / n), i = 1..n, for n a power
    of two; otherwise those of the power of two below n, then every other slope of twice that
    power. Lightning Attention uses them as its per-head decay rates."""
    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-8.0 / m)
        return [start ** (i + 1) for i in range(m)]

    if n & (n - 1) == 0:
        return power_of_two(n)
    below = 1 << (n.bit_length() - 1)
    return power_of_two(below) + alibi_slopes(2 * below)[0::2][: n - below]


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """Lightning Attention's data-independent log decay per head, -s_h (1 - l / (L - 1) + 1e-5):
    ALiBi slopes s_h scaled down with depth as TransNormerLLM and MiniMax-01 do, so the first
    layer forgets fastest and the last almost never (a single-layer model keeps s_h (1 + 1e-5))."""
    depth = 1.0 if num_layers <= 1 else 1.0 - layer_idx / (num_layers - 1)
    return [-s * (depth + 1e-5) for s in alibi_slopes(num_heads)]


class LightningGate(nn.Module):
    """Lightning Attention's decay (TransNormerLLM, Lightning Attention-2, MiniMax-01): a constant
    log a = -s_h per state head, no parameters. hidden: [B, T, C] -> [B, T, Hs], at least fp32.

    Deviation: the published models are multi-head with one slope per head; with GQA sharing the
    state lives per KV head, so the slopes are those of Hs = H_kv heads (one per state head).
    """

    def __init__(self, num_state_heads: int, layer_idx: int, num_layers: int):
        super().__init__()
        self.log_decay = tuple(lightning_log_decay(num_state_heads, layer_idx, num_layers))

    def forward(self, hidden: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        g = torch.tensor(self.log_decay, dtype=dtype, device=hidden.device)
        return g.expand(*hidden.shape[:2], len(self.log_decay)).contiguous()

    def extra_repr(self) -> str:
        return "log_decay=[" + ", ".join(f"{x:.3g}" for x in self.log_decay) + "]"


def build_gate(kind: str, *, hidden_size: int, num_kv_heads: int, normalizer: float, repeat: int,
               num_state_heads: int | None = None, layer_idx: int = 0, num_layers: int = 1) -> nn.Module | None:
    """The gate `kind` for one layer; `lightning` needs the state's heads and the layer's depth."""
    if kind == "none":
        return None
    if kind == "liger":
        return LigerGate(normalizer, repeat)
    if kind == "scalar":
        return ScalarGate(hidden_size, num_kv_heads)
    if kind == "mamba2":
        return Mamba2Gate(hidden_size, num_kv_heads)
    if kind == "lightning":
        return LightningGate(num_state_heads or num_kv_heads, layer_idx, num_layers)
    raise ValueError(f"no gate {kind!r}")
