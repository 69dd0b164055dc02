"""Long English documents (4k+ tokens each) and perplexity by position over their first tokens.

The documents ship inside the PyPI package ``pyperformance`` (pinned in
``requirements/offline-assets.txt``, installed with ``--no-deps``), whose benchmarks carry
their input data: the Docutils documentation (each file chosen here states "placed in the
public domain"), CPython HOWTO guides (PSF License Agreement / Zero-Clause BSD) and the
opening letters of Mary Shelley's *Frankenstein* (1818, public domain). They are read as
files; the package is never imported.

``MANIFEST`` fixes the set and its split by document: ``heldout`` documents are for
evaluation only, ``train`` documents may be fed to distillation (:func:`write_jsonl`).
Every document has at least 4,700 SmolLM2 tokens (measured: 4,744 to 34,083).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from linearize.assets import package_file

from .perplexity import DEFAULT_BUCKET_EDGES, bucket_sums, bucket_table, token_nll
from .progress import bar

PACKAGE, PIP_NAME = "pyperformance", "pyperformance"
DATA_DIR = "data-files/benchmarks"
DOCUTILS, CPYTHON = "bm_docutils/data/docs", "bm_sphinx/data/Doc/howto"
PUBLIC_DOMAIN, PSF = "public domain", "PSF-2.0 / 0BSD (CPython documentation)"
SPLITS = ("train", "heldout")

# (path under DATA_DIR, title, license, split). Held out: one literary text, two design
# essays, three CPython guides and two Docutils references, so eval covers prose and docs.
MANIFEST = (
    ("bm_bpe_tokeniser/data/frankenstein_intro.txt", "Frankenstein (Mary Shelley), Letters 1-4", PUBLIC_DOMAIN, "heldout"),
    (f"{DOCUTILS}/peps/pep-0287.txt", "PEP 287: reStructuredText Docstring Format", PUBLIC_DOMAIN, "heldout"),
    (f"{DOCUTILS}/dev/rst/problems.txt", "Problems With StructuredText", PUBLIC_DOMAIN, "heldout"),
    (f"{DOCUTILS}/user/odt.txt", "Odt Writer for Docutils", PUBLIC_DOMAIN, "heldout"),
    (f"{DOCUTILS}/ref/rst/directives.txt", "reStructuredText Directives", PUBLIC_DOMAIN, "heldout"),
    (f"{CPYTHON}/descriptor.rst", "Descriptor Guide", PSF, "heldout"),
    (f"{CPYTHON}/functional.rst", "Functional Programming HOWTO", PSF, "heldout"),
    (f"{CPYTHON}/argparse.rst", "Argparse Tutorial", PSF, "heldout"),
    (f"{DOCUTILS}/peps/pep-0258.txt", "PEP 258: Docutils Design Specification", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/dev/policies.txt", "Docutils Project Policies", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/dev/rst/alternatives.txt", "A Record of reStructuredText Syntax Alternatives", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/dev/todo.txt", "Docutils To Do List", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/ref/doctree.txt", "The Docutils Document Tree", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/ref/rst/restructuredtext.txt", "reStructuredText Markup Specification", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/user/config.txt", "Docutils Configuration", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/user/latex.txt", "Generating LaTeX with Docutils", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/user/links.txt", "Docutils Link List", PUBLIC_DOMAIN, "train"),
    (f"{DOCUTILS}/user/tools.txt", "Docutils Front-End Tools", PUBLIC_DOMAIN, "train"),
    (f"{CPYTHON}/curses.rst", "Curses Programming with Python", PSF, "train"),
    (f"{CPYTHON}/enum.rst", "Enum HOWTO", PSF, "train"),
    (f"{CPYTHON}/isolating-extensions.rst", "Isolating Extension Modules", PSF, "train"),
    (f"{CPYTHON}/instrumentation.rst", "Instrumenting CPython with DTrace and SystemTap", PSF, "train"),
)


@dataclass(frozen=True)
class LongDocument:
    """One document: ``path`` is relative to the package's ``DATA_DIR``."""

    title: str
    text: str
    path: str
    license: str
    split: str


def document_path(relative: str) -> Path:
    """The installed file of a manifest entry; ``MissingAssetError`` (a ``FileNotFoundError``)
    naming the pip command when ``pyperformance`` is absent or lacks the file."""
    return package_file(PACKAGE, f"{DATA_DIR}/{relative}", PIP_NAME)


def long_documents(split: str | None = None) -> list[LongDocument]:
    """The documents of ``split`` (``"train"``, ``"heldout"`` or None for all), in manifest
    order. Text is the file as shipped (reStructuredText markup kept), stripped at both ends."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    return [
        LongDocument(title, document_path(path).read_text(encoding="utf-8").strip(), path, lic, s)
        for path, title, lic, s in MANIFEST if split is None or s == split
    ]


def write_jsonl(path: str | Path, split: str = "train") -> Path:
    """Write ``split`` as JSON lines ``{"text": ...}``, one document a line, for a distillation
    recipe's ``data.source`` (a local ``.jsonl`` file). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in long_documents(split):
            f.write(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n")
    return path


def _summary(total: float, n: int) -> dict:
    mean = total / n if n else None
    return {"tokens": n, "mean_nll": mean, "perplexity": math.exp(mean) if n else None}


@torch.no_grad()
def long_document_perplexity(
    model,
    tokenizer,
    documents=None,
    n_tokens: int = 4096,
    edges=DEFAULT_BUCKET_EDGES,
    progress: bool | None = None,
    desc: str = "long-doc",
) -> dict:
    """Next-token NLL over each document's first ``n_tokens`` tokens, bucketed by position.

    documents: :class:`LongDocument` objects or ``(title, text)`` pairs (default: the
    held-out split). Each document is one ``[1, <= n_tokens]`` forward; the target at
    position ``p`` (1 <= p < n_tokens) falls in bucket ``[start, end)`` of ``edges`` when
    ``start <= p < end``. Means are token-weighted over all documents.

    Returns ``{"n_tokens", "edges", "buckets": [{start, end, tokens, mean_nll, perplexity}],
    "overall": {tokens, mean_nll, perplexity}, "documents": [{title, tokens, mean_nll,
    perplexity}]}``. ``progress``: a bar per document (None: as the surrounding
    :func:`~linearize.eval.progress.progress_bars` block says; drawn on a terminal only).
    """
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be at least 2, got {n_tokens}")
    edges = list(edges)
    docs = long_documents("heldout") if documents is None else documents
    pairs = [(d.title, d.text) if isinstance(d, LongDocument) else tuple(d) for d in docs]
    device = next(model.parameters()).device
    sums, counts, per_doc = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1), []
    for title, text in bar(pairs, desc=desc, unit="doc", enabled=progress):
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens].to(device)
        if ids.shape[1] < 2:
            raise ValueError(f"document {title!r} has fewer than two tokens")
        nll = token_nll(model, ids)[0].cpu()
        s, c = bucket_sums(nll, edges)
        sums = [a + b for a, b in zip(sums, s)]
        counts = [a + b for a, b in zip(counts, c)]
        per_doc.append({"title": title, **_summary(float(nll.double().sum()), nll.numel())})
    total = sum(d["mean_nll"] * d["tokens"] for d in per_doc)
    return {
        "n_tokens": n_tokens,
        "edges": edges,
        "buckets": bucket_table(sums, counts, edges),
        "overall": _summary(total, sum(d["tokens"] for d in per_doc)),
        "documents": per_doc,
    }


def main(argv=None) -> int:
    """``python -m linearize.eval.long_documents {train,heldout} OUT.jsonl``."""
    p = argparse.ArgumentParser(description="Write a split of the long documents as JSON lines "
                                            "({\"text\": ...}) for a recipe's data.source.")
    p.add_argument("split", choices=SPLITS)
    p.add_argument("out", help="the .jsonl file to write")
    args = p.parse_args(argv)
    path = write_jsonl(args.out, args.split)
    print(f"{len(long_documents(args.split))} documents -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
