"""Scheduled sliding-window dropout for distillation (see `recipe.WindowDropoutSection`).

Before each optimizer step the trainer draws, per linearized layer, whether that layer trains
the step with its softmax window cut short; the draw is seeded by (seed, stage, step), so a
resumed run and every process draw the same layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .recipe import WindowDropoutSection


def dropout_rate(section: WindowDropoutSection, step: int, steps: int) -> float:
    """p at optimizer step `step` (0-based) of `steps`: linear from rate to final_rate."""
    if steps <= 1:
        return section.rate
    return section.rate + (section.final_rate - section.rate) * step / (steps - 1)


def draw_dropped_layers(section: WindowDropoutSection, step: int, steps: int, num_layers: int, seed: int,
                        stage: int) -> torch.Tensor:
    """[num_layers] bool: which layers train this step with the short window."""
    p = dropout_rate(section, step, steps)
    if p <= 0 or num_layers == 0:
        return torch.zeros(num_layers, dtype=torch.bool)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stage) * 1_000_003 + step)
    return torch.rand(num_layers, generator=generator) < p


def set_train_windows(layers: Sequence, dropped: torch.Tensor, window: int | None) -> None:
    """Give the dropped layers the short window for the next forwards, the others their own;
    window None restores every layer's own window."""
    for layer, drop in zip(layers, dropped.tolist()):
        layer.train_window = window if drop and window is not None else None
