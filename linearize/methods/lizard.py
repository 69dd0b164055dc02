"""Lizard's preset (`linearize.mixers.lizard`)."""
from __future__ import annotations

from .base import Method, MethodDefaults


class Lizard(Method):
    """Hedgehog maps, a scalar gate per token and head, a normalized recurrence, a 128-token
    window with 4 meta-memory sink logits; learned per-head branch weights."""

    name = "lizard"
    preset = MethodDefaults(128, "scalar", "hedgehog", "learned", True, False, num_sink_logits=4,
                            allowed_gates=("scalar", "mamba2", "liger", "lightning"))
