"""Lightning's preset: Liger Attention with Lightning Attention's fixed per-head decay in place
of the key-pooled gate, normalized (`linearize.mixers.lightning`)."""
from __future__ import annotations

from .base import Method, MethodDefaults


class Lightning(Method):
    """Softmax maps on q and k, the `lightning` gate (a constant decay per state head, no
    parameters), the recurrence divided by its normalizer, a 64-token window with 4 sink tokens,
    mixed 0.5 / 0.5; nothing to train before LoRA."""

    name = "lightning"
    preset = MethodDefaults(64, "lightning", "softmax", "fixed", True, False, num_sink_tokens=4,
                            allowed_gates=("lightning",))
