"""Gated DeltaNet's preset and rules (`linearize.mixers.deltanet`)."""
from __future__ import annotations

from typing import Any

from .base import Method, MethodDefaults, l2_problem


class GatedDeltaNet(Method):
    """The gated delta rule on L2-normalised raw q, k (beta = sigmoid(x W_beta), Mamba2 decay)
    beside a 64-token window with 4 sink tokens; learned per-head branch weights. The delta rule
    has no normalizer and the fused hybrid kernel runs GLA, not this recurrence."""

    name = "gated-deltanet"
    preset = MethodDefaults(64, "mamba2", "l2", "learned", False, False, num_sink_tokens=4,
                            allowed_gates=("mamba2", "scalar", "none"))
    fused_kernel = False

    @classmethod
    def feature_map_problem(cls, cfg: Any) -> str | None:
        if cfg.feature_map == "none":
            return f"{cls.name} needs a feature map: l2 (its own)"
        if cfg.feature_map not in (None, "l2"):
            return l2_problem(cls.name, cfg.feature_map)
        return None

    @classmethod
    def mixing_problem(cls, cfg: Any) -> str | None:
        if cfg.normalize or cfg.mixing == "shared-denominator":
            return ("gated-deltanet's delta rule has no normalizer: leave normalize off and use mixing "
                    "fixed or learned")
        return super().mixing_problem(cfg)
