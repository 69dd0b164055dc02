"""Based's preset (`linearize.mixers.based`)."""
from __future__ import annotations

from .base import Method, MethodDefaults


class Based(Method):
    """Based's Taylor feature map (a learned projection to 16 channels, 1 + 16 + 256 features),
    normalized linear attention without decay, beside a 64-token window with 4 sink tokens;
    learned per-head branch weights."""

    name = "based"
    preset = MethodDefaults(64, "none", "taylor", "learned", True, False, num_sink_tokens=4,
                            allowed_gates=("none", "lightning", "scalar", "mamba2"))
