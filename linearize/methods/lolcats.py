"""LoLCATs' preset and rules (`linearize.mixers.lolcats`)."""
from __future__ import annotations

from typing import Any

from .base import Method, MethodDefaults


class Lolcats(Method):
    """LoLCATs as published: a 64-token softmax window and Hedgehog linear attention over the
    keys that left it, under one denominator (mixing `lolcats`, this method's own); one key map
    (and state) per query head."""

    name = "lolcats"
    preset = MethodDefaults(64, "none", "hedgehog", "lolcats", True, True,
                            allowed_gates=("none", "scalar", "mamba2", "lightning"), share_state=False)

    @classmethod
    def mixing_problem(cls, cfg: Any) -> str | None:
        return None
