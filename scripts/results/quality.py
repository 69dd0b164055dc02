"""The results document's answer to "is the converted model better than truncating attention?":
one table over every quality-at-length page (docs/quality-at-length*.md), read from the records
that scripts/quality_at_length.py keeps in docs/data/<page>/, teacher and window + sinks first."""

from __future__ import annotations

import json
import re
from pathlib import Path

from quality_runs import (LABELS, REFERENCES, RUNS, conversion_of, decode_state_mib, is_trained,
                          is_truncation, sparse_settings)


def quality_section(doc_dir: Path) -> list[str]:
    """Markdown lines of the section; empty when no page beside the document has records."""
    pages = [p for p in sorted(doc_dir.glob("quality-at-length*.md")) if (doc_dir / "data" / p.stem).is_dir()]
    rows, refs = [], {}
    for page in pages:
        budget = _budget(page)
        for name, record in _records(doc_dir / "data" / page.stem):
            if (name in REFERENCES or is_default(name)) and not is_trained(name) and "long_doc" in record:
                refs.setdefault(name, (page, record))
            elif is_trained(name) and budget and "long_doc" in record:
                rows.append((page, budget, name, record))
    if "teacher" not in refs or "window-sinks" not in refs or not rows:
        return []
    teacher, base = _long(refs["teacher"][1]), _long(refs["window-sinks"][1])
    table = ["| run | training (page) | long docs | × teacher | × window + sinks | joined 1k docs | short "
             "| passkey 2k / 4k % | decode state @ 16k |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    untrained = [n for n in REFERENCES if n in refs] + [n for n in refs if n not in REFERENCES]  # teacher first
    for name in untrained:
        page, record = refs[name]
        table.append(_row(name, f"[untrained]({page.name})", record, teacher, base))
    for page, budget, name, record in rows:
        table.append(_row(name, f"[{record.get('budget', budget)}]({page.name})", record, teacher, base))
    judged = [r for r in rows if r[2] not in REFERENCES] or rows
    best = min(judged, key=lambda r: _long(r[3]))
    beaten_by = [r for r in rows if is_truncation(r[2]) and _long(r[3]) < _long(best[3])]
    return ["## Quality at length: better than truncating attention?", "",
            "Every trained run of the quality-at-length pages, and `linearize convert`'s default untrained, on "
            "their held-out text: the 8 long documents "
            "(first 4,096 tokens each), the summaries joined into 1,024-token documents and the short summaries, "
            "passkey at 2k and 4k with the key beyond the window (1 trial per depth), and one sequence's decode "
            "state at 16k tokens. Each page says how its runs were trained and measured; the table is rendered "
            "from its records.", "",
            *table, "",
            f"Best: {LABELS.get(best[2], best[2])} ({best[3].get('budget', best[1])}) at {_long(best[3]) / teacher:.2f}x the "
            f"teacher's long-document perplexity, against {base / teacher:.2f}x for window + sinks"
            + "".join(f"; {LABELS.get(n, n)}: {_long(refs[n][1]) / teacher:.2f}x with {decode_state_mib(n):.1f} MiB"
                      for n in untrained if n not in ("teacher", "window-sinks"))
            + "".join(f"; a plain window trained alike beats it: {LABELS.get(n, n)} ({rec.get('budget', b)}) at "
                      f"{_long(rec) / teacher:.2f}x with {decode_state_mib(n):.1f} MiB" for _, b, n, rec in beaten_by)
            + ".", ""]


def is_default(name: str) -> bool:
    """Whether the run evaluates today's recommended conversion (`linearize convert` with no
    options), LoLA's budget included."""
    from linearize.config import RECOMMENDED

    conversion = conversion_of(name)
    if conversion is None:
        return False
    return {**conversion, **sparse_settings(name)} == RECOMMENDED


def refresh_quality_section(doc: Path) -> Path:
    """Rewrite only the quality section of an existing results document (from its heading to the
    next section), or put it after the document's first paragraphs when it has none."""
    text = doc.read_text()
    section = "\n".join(quality_section(doc.parent))
    heading = "## Quality at length"
    if heading in text:
        head, rest = text.split(heading, 1)
        tail = rest[rest.index("\n## "):] if "\n## " in rest else "\n"
        text = head + section.rstrip() + "\n" + tail
    else:
        head, sep, rest = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + section.rstrip() + "\n" + sep + rest
    doc.write_text(text)
    return doc


def _budget(page: Path) -> str | None:
    """'48k tokens, 2,048-token rows' from the command the page's first paragraph quotes."""
    text = page.read_text()
    found = [re.search(rf"--{key} (\d+)", text) for key in ("seq-len", "stage1-tokens", "stage2-tokens")]
    if not all(found):
        return None
    seq, s1, s2 = (int(m.group(1)) for m in found)
    return f"{(s1 + s2) // 1024}k tokens, {seq:,}-token rows"


def _records(folder: Path):
    """(run name, record) in the order of scripts/quality_runs.py's RUNS table."""
    order = {name: i for i, name in enumerate(RUNS)}
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    return sorted(found.items(), key=lambda kv: order.get(kv[0], len(order)))


def _long(record: dict) -> float:
    return record["long_doc"]["overall"]["perplexity"]


def _row(name: str, page: str, record: dict, teacher: float, base: float) -> str:
    pk = record.get("passkey")
    passkey = " / ".join(f"{sum(a) / len(a):.0f}" for a in pk["accuracy"]) if pk else "—"
    mib = decode_state_mib(name)
    cells = [LABELS.get(name, name), page, f"{_long(record):.2f}", f"{_long(record) / teacher:.2f}x",
             f"{_long(record) / base:.2f}x", _ppl(record.get("joined")), _ppl(record.get("short")), passkey,
             "—" if mib is None else f"{mib:.1f} MiB"]
    return "| " + " | ".join(cells) + " |"


def _ppl(x: dict | None) -> str:
    return "—" if x is None else f"{x['perplexity']:.2f}"
