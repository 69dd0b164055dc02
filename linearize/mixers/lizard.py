"""Lizard: Hedgehog feature maps, a scalar gate per token and head, a normalized recurrence
and a 128-token softmax window with 4 meta-memory sink logits; the student drops RoPE in the
recurrence.

Initialisation: Hedgehog maps at the identity, the gate at a ~1000-token memory with a zero
projection, sink logits at -5 (the window is then almost exactly the teacher's softmax),
per-head branch weights 0.5 / 0.5 (the paper's y_lin + alpha * y_win is the case of a unit
linear weight; learning both lets stage 1 pick the balance).
"""
from __future__ import annotations

from ..methods import Lizard
from .base import LinearizedAttention


class LizardAttention(LinearizedAttention):
    method = Lizard
