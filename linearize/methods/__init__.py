"""The conversion methods, one module each, and the table that names them.

Adding a method: a `Method` subclass here (its preset and rules), its attention layer in
`linearize.mixers` (a `LinearizedAttention` subclass whose `method` is that class), one line in
`REGISTRY` and one in `linearize.mixers.MIXERS`, and its tests.
"""
from __future__ import annotations

from .base import Method, MethodDefaults
from .based import Based
from .deltanet import GatedDeltaNet
from .lightning import Lightning
from .liger import LigerGLA, LigerHGRN2
from .lizard import Lizard
from .lolcats import Lolcats
from .window_sinks import WindowSinks

# Method name -> Method, in the order the CLI and the docs list them.
REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (LigerGLA, LigerHGRN2, Lizard, Lolcats, GatedDeltaNet, Lightning, Based, WindowSinks)
}

__all__ = ["REGISTRY", "Method", "MethodDefaults", "Based", "GatedDeltaNet", "LigerGLA", "LigerHGRN2", "Lightning",
           "Lizard", "Lolcats", "WindowSinks"]
