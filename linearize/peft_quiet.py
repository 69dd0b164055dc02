"""Silence the one warning peft raises on every adapter setup under transformers 5."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def peft_quietly():
    """Within this block, peft's read of `is_gradient_checkpointing` (deprecated by transformers 5,
    nothing for our users to act on) raises no FutureWarning; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
