"""The window + sinks baseline's preset and rules (`linearize.mixers.window_sinks`)."""
from __future__ import annotations

from typing import Any

from .base import Method, MethodDefaults


class WindowSinks(Method):
    """Zero-training baseline: softmax over 4 sink tokens and the last 64 tokens, no linear
    branch (so no window 0, feature map or mixing other than `window-only`)."""

    name = "window-sinks"
    preset = MethodDefaults(64, "none", "none", "window-only", False, True, num_sink_tokens=4)

    @classmethod
    def window_problem(cls, cfg: Any) -> str | None:
        if cfg.window == 0:
            return "window-sinks has no recurrent branch: its window must be >= 1 (default 64)"
        return None

    @classmethod
    def feature_map_problem(cls, cfg: Any) -> str | None:
        if cfg.feature_map not in (None, "none"):
            return "window-sinks has no linear branch: leave feature_map unset"
        return None

    @classmethod
    def mixing_problem(cls, cfg: Any) -> str | None:
        if cfg.mixing is not None and cfg.mixing != "window-only":
            return "window-sinks only supports mixing='window-only'"
        return None
