"""What a benchmark writes: `<name>.json` (machine, settings, rows, summary), `<name>.md` (the
table and the target lines) beside the figure, and how its numbers print."""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "linearize-bench-1"


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.2g}"
    return f"{x:,.{digits}f}"


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{1 if abs(n) >= 100 else 2}f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one char per column: l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def target(description: str, value: float | None, threshold: float, at: str) -> dict:
    """A target line: met is None when the length it is stated at was not measured."""
    met = None if value is None else bool(value >= threshold)
    return {"target": description, "at": at, "value": value, "threshold": threshold, "met": met}


def target_lines(targets: list[dict]) -> list[str]:
    out = []
    for t in targets:
        if t["value"] is None:
            out.append(f"target: {t['target']}: not measured ({t['at']} not in the run)")
        else:
            verdict = "met" if t["met"] else "NOT met"
            out.append(f"target: {t['target']}: {t['value']:.2f}x at {t['at']} ({verdict})")
    return out


def write_report(out_dir: str | Path, name: str, report: dict, table: str, title: str) -> dict:
    """Write `<name>.json` and `<name>.md` into out_dir; returns report with their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    if (out / f"{name}.png").is_file():
        files["plot"] = str(out / f"{name}.png")
    report = {"format": FORMAT, **report, "files": files}
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out / f"{name}.json")
    m = report.get("machine", {})
    md = [f"# {title}", "",
          f"{report['model']['name'] if 'model' in report else ''} · {m.get('device', '')} · "
          f"{m.get('cpu', '')} ({m.get('cpu_affinity', '?')} CPUs, {m.get('torch_threads', '?')} threads) · "
          f"torch {m.get('torch', '')} · transformers {m.get('transformers', '')} · {m.get('date', '')}", "",
          table, ""]
    md += [f"- {line}" for line in target_lines(report.get("targets", []))]
    if report.get("notes"):
        md += [""] + [f"{n}" for n in report["notes"]]
    if "plot" in files:
        md += ["", f"![{name}]({name}.png)"]
    (out / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
    return report
