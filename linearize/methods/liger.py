"""Liger's presets: parameter-free softmax feature maps and gates pooled from the key; Liger
Attention mixes a 64-token window with the recurrence 0.5 / 0.5 (`linearize.mixers.liger`)."""
from __future__ import annotations

from .base import Method, MethodDefaults


class LigerGLA(Method):
    """Liger-GLA: softmax maps on q and k, a per-channel gate from the key (or scalar, mamba2)."""

    name = "liger-gla"
    preset = MethodDefaults(64, "liger", "softmax", "fixed", False, False,
                            allowed_gates=("liger", "scalar", "mamba2", "lightning"))


class LigerHGRN2(Method):
    """Liger-HGRN2: the key is tied to the liger gate, so no other gate fits."""

    name = "liger-hgrn2"
    preset = MethodDefaults(64, "liger", "softmax", "fixed", False, False, allowed_gates=("liger",))
