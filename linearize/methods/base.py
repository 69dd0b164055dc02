"""What a conversion method is before any model exists: its preset and the settings it refuses.

A `Method` is pure Python (no torch), so `LinearizeConfig` can ask it without loading the
attention layers; each method's layer in `linearize.mixers` names the `Method` it implements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class MethodDefaults:
    """The values a method gives the `LinearizeConfig` fields left as None, and the gates it takes."""

    window: int
    gate: str
    feature_map: str
    mixing: str
    normalize: bool
    linear_rope: bool
    num_sink_tokens: int = 0
    num_sink_logits: int = 0
    allowed_gates: tuple[str, ...] = ("none",)
    share_state: bool = True
    init: str = "paper"


class Method:
    """One conversion method as a config sees it.

    `preset` fills the fields a config leaves unset; `problem` names what in a config the method
    cannot run, asking in turn about the window, the gate, the feature map and the mixing;
    `fused_kernel` says whether the fused hybrid kernel (GLA recurrence beside the window) can
    compute its linear branch. The shared rules: a gate of the preset's, a feature map for the
    linear branch, and neither gated-deltanet's `l2` map nor LoLCATs' mixing rule; a method
    overrides the question whose answer differs for it.
    """

    name: ClassVar[str] = ""
    preset: ClassVar[MethodDefaults]
    fused_kernel: ClassVar[bool] = True

    @classmethod
    def problem(cls, cfg: Any) -> str | None:
        """What `cfg` (a LinearizeConfig, resolved or not, its values already known names) sets
        that this method cannot take, or None."""
        return (cls.window_problem(cfg) or cls.gate_problem(cfg) or cls.feature_map_problem(cfg)
                or cls.mixing_problem(cfg))

    @classmethod
    def window_problem(cls, cfg: Any) -> str | None:
        return None

    @classmethod
    def gate_problem(cls, cfg: Any) -> str | None:
        allowed = cls.preset.allowed_gates
        if cfg.gate is not None and cfg.gate not in allowed:
            return f"method {cls.name} supports gate in ({', '.join(allowed)}), got {cfg.gate!r}"
        return None

    @classmethod
    def feature_map_problem(cls, cfg: Any) -> str | None:
        if cfg.feature_map == "none":
            return f"{cls.name} needs a feature map: softmax, hedgehog or taylor"
        if cfg.feature_map == "l2":
            return l2_problem(cls.name, cfg.feature_map)
        return None

    @classmethod
    def mixing_problem(cls, cfg: Any) -> str | None:
        if cfg.mixing == "lolcats":
            return f"mixing='lolcats' is LoLCATs' own rule; method {cls.name} cannot use it"
        return None

def l2_problem(method: str, feature_map: str) -> str:
    """The message for feature map `l2` on another method, or another map on gated-deltanet."""
    return ("feature_map 'l2' is gated-deltanet's own (the delta rule on L2-normalised q, k), and "
            f"gated-deltanet takes no other: method {method} with {feature_map!r}")
