"""Window + sinks: softmax attention over the first 4 tokens and the last 64 (no training).

The zero-training baseline every trained method has to beat. With a window at least as long
as the sequence it is exactly the teacher.
"""
from __future__ import annotations

from ..methods import WindowSinks
from .base import LinearizedAttention


class WindowSinksAttention(LinearizedAttention):
    method = WindowSinks
