"""The numbers of each row of the results tables, read from the collected step outputs, and how
one number prints."""

from __future__ import annotations

import math


def num(x, digits: int = 2) -> str:
    """A table cell: — for a missing or non-finite value, scientific notation from 1e4."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:,.{digits}f}"


def _mmlu(results: dict) -> tuple[float | None, float | None, int | None]:
    row = results.get("tasks", {}).get("mmlu_local")
    if not row:
        return None, None, None
    return row.get("student"), row.get("student_stderr"), row.get("samples")


def eval_fields(ev: dict, teacher_row: dict) -> dict:
    """The numbers of one evaluated student (`evaluate`'s dict) shared by every table row."""
    ppl = ev["metrics"]["perplexity"]["student"]["perplexity"]
    long = ev["long_perplexity"]["perplexity"]
    agr = ev["metrics"].get("agreement", {})
    return {"ppl": ppl, "ppl_ratio": ppl / teacher_row["ppl"], "long": long, "long_ratio": long / teacher_row["long"],
            "top1": agr.get("top1_agreement"), "kl": agr.get("kl_mean"),
            "passkey": ev["metrics"]["passkey"]["student"]["mean_accuracy"], "mmlu": _mmlu(ev)}


def method_rows(collected: dict) -> list[dict]:
    """One dict per row of the main table (teacher first), numbers only."""
    teacher = collected["teacher"]
    t_ppl = teacher["metrics"]["perplexity"]["student"]["perplexity"]
    t_long = teacher["long_perplexity"]["perplexity"]
    rows = [{"name": "teacher", "ppl": t_ppl, "ppl_ratio": 1.0, "long_untrained": t_long, "long": t_long,
             "long_ratio": 1.0, "top1": 100.0, "kl": 0.0,
             "passkey": teacher["metrics"]["passkey"]["student"]["mean_accuracy"],
             "mmlu": _mmlu(teacher)}]
    for name, m in collected["methods"].items():
        speed = m["speed"] or {"prefill_ratio": {"speedup": None},
                               "decode_ratio": {"speedup": None, "cache_ratio": None}}
        rows.append({
            "name": name, **eval_fields(m["eval"], rows[0]),
            "ppl_untrained": m["untrained"]["perplexity"]["perplexity"],
            "long_untrained": m["untrained"]["long_perplexity"]["perplexity"],
            "prefill_speedup": speed["prefill_ratio"]["speedup"], "decode_speedup": speed["decode_ratio"]["speedup"],
            "cache_ratio": speed["decode_ratio"]["cache_ratio"], "trained": m["training"] is not None,
            "training": m["training"],
        })
    return rows


def extra_rows(collected: dict, teacher_row: dict) -> list[dict]:
    """Rows of the longer runs (same keys as `method_rows`, plus method, tokens and minutes)."""
    rows = []
    for name, m in collected.get("extra", {}).items():
        stages = (m["training"] or {}).get("stages", {})
        rows.append({
            "name": name, "method": m["method"], **eval_fields(m["eval"], teacher_row), "trained": True,
            "tokens": sum(st["tokens"] for st in stages.values()),
            "minutes": sum(st["seconds"] for st in stages.values()) / 60, "extra": True,
        })
    return rows
