"""Progress bars with an ETA for what runs for minutes: the eval metrics (perplexity, agreement,
passkey, MQAR, long documents) and the steps of converting a large model.

Off unless a caller turns them on (`linearize eval` and `linearize convert` do, without
--quiet), and never drawn when stderr is not a terminal (logs, CI, pipes). Library calls,
e.g. `linearize.convert` or the held-out perplexity during `linearize distill`, stay silent.
"""
from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm

_state = {"on": False, "label": ""}


@contextlib.contextmanager
def progress_bars(on: bool | None = None, label: str | None = None):
    """Inside the block, metric bars are drawn when `on` (None: as outside) and their
    descriptions start with `label` (e.g. the role, "student"; None: as outside)."""
    saved = dict(_state)
    if on is not None:
        _state["on"] = on
    if label is not None:
        _state["label"] = label
    try:
        yield
    finally:
        _state.update(saved)


def shown(enabled: bool | None = None) -> bool:
    """Whether a bar would be drawn: turned on (`enabled`, or the block's setting when None)
    and stderr is a terminal."""
    on = _state["on"] if enabled is None else enabled
    return bool(on) and sys.stderr.isatty()


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", enabled: bool | None = None):
    """A tqdm bar (elapsed, rate and remaining time) over `iterable`, or updated by hand."""
    label = f"{_state['label']} " if _state["label"] else ""
    return tqdm(iterable, total=total, desc=label + desc, unit=unit, dynamic_ncols=True, leave=False,
                disable=not shown(enabled), file=sys.stderr)
