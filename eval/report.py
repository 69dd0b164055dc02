"""Merge several ``linearize eval`` run folders into one markdown report with plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .runner import FORMAT, pct, metric_rows, run_markdown


def load_run(path: str | Path) -> tuple[Path, dict]:
    """``(run folder, results dict)`` from a run folder or its ``results.json``."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no results.json in {path}: pass folders written by `linearize eval`")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from e
    if results.get("format") != FORMAT:
        raise ValueError(f"{file} is not a linearize eval result (format {results.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return file.parent, results


def _names(dirs: list[Path]) -> list[str]:
    names = []
    for d in dirs:
        base = d.resolve().name
        name, k = base, 2
        while name in names:
            name, k = f"{base} ({k})", k + 1
        names.append(name)
    return names


def _shared_teacher(values: list[float | None]) -> tuple[float | None, bool]:
    present = [v for v in values if v is not None]
    if not present:
        return None, True
    return present[0], all(abs(v - present[0]) < 1e-9 for v in present)


def summary_table(names: list[str], runs: list[dict]) -> str:
    """One row per task, one column per run ("student (recovery %)"), teacher first."""
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r["tasks"] if t not in tasks]
    lines = ["| Task | Metric | Shots | Teacher | " + " | ".join(names) + " |",
             "|---|---|---|---:|" + "---:|" * len(names)]
    for task in tasks:
        rows = [r["tasks"].get(task) for r in runs]
        first = next(row for row in rows if row)
        teacher, same = _shared_teacher([row.get("teacher") if row else None for row in rows])
        cells = [task, first["metric"], str(first["num_fewshot"]), pct(teacher) if same else "per run"]
        for row in rows:
            if not row:
                cells.append("—")
                continue
            cell = pct(row["student"])
            if row.get("recovery") is not None:
                cell += f" ({row['recovery']:.1f}%)"
            if not same and row.get("teacher") is not None:
                cell += f" vs {pct(row['teacher'])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_summary_table(names: list[str], runs: list[dict]) -> str:
    """Own metrics, one column per run (recovery in parentheses)."""
    per_run = [{name: (t, s, rec) for name, t, s, rec in metric_rows(r)} for r in runs]
    metrics: list[str] = []
    for rows in per_run:
        metrics += [m for m in rows if m not in metrics]
    lines = ["| Metric | Teacher | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for m in metrics:
        teachers = [rows[m][0] for rows in per_run if m in rows and rows[m][0] is not None]
        same = len(set(teachers)) <= 1
        cells = [m, (teachers[0] if teachers else "—") if same else "per run"]
        for rows in per_run:
            if m not in rows:
                cells.append("—")
                continue
            t, s, rec = rows[m]
            cell = s + (f" ({rec}%)" if rec and rec != "—" else "")
            if not same and t is not None:
                cell += f" vs {t}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combined_plots(names: list[str], runs: list[dict], folder: Path) -> dict[str, Path]:
    """Cross-run plots (task scores, MQAR curves, agreement by position) into ``folder``."""
    from .plots import plot_agreement, plot_mqar, plot_tasks

    out = {}
    bars: dict[str, dict[str, float]] = {}
    for name, r in zip(names, runs):
        for task, row in r["tasks"].items():
            if row.get("teacher") is not None:
                bars.setdefault(task, {}).setdefault("teacher", row["teacher"])
            if row.get("student") is not None:
                bars.setdefault(task, {})[name] = row["student"]
    if bars:
        out["tasks"] = plot_tasks(bars, folder / "tasks.png")
    curves = {}
    for name, r in zip(names, runs):
        mq = r["metrics"].get("mqar")
        if mq:
            if "teacher" in mq and "teacher" not in curves:
                curves["teacher"] = mq["teacher"]
            curves[name] = mq["student"]
    if curves:
        out["mqar"] = plot_mqar(curves, folder / "mqar.png")
    agr = {name: r["metrics"]["agreement"] for name, r in zip(names, runs) if "agreement" in r["metrics"]}
    if agr:
        out["agreement"] = plot_agreement(agr, folder / "agreement.png")
    return out


def _demote(markdown: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def write_report(run_paths: list[str | Path], out: str | Path, title: str = "linearize evaluation report") -> Path:
    """Write the markdown report for ``run_paths`` to ``out`` (plots next to it); return its path."""
    if not run_paths:
        raise ValueError("no run folders given")
    loaded = [load_run(p) for p in run_paths]
    dirs, runs = [d for d, _ in loaded], [r for _, r in loaded]
    names = _names(dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out.parent / f"{out.stem}_plots"
    parts = [f"# {title}", ""]
    parts += [f"{len(runs)} run(s): " + ", ".join(f"`{n}`" for n in names) + ".", ""]
    if any(r["tasks"] for r in runs):
        parts += ["## Tasks", "", summary_table(names, runs), "",
                  "Scores in %; recovery (student / teacher) in parentheses.", ""]
    if any(r["metrics"] for r in runs):
        parts += ["## Own metrics", "", metrics_summary_table(names, runs), ""]
    plots = combined_plots(names, runs, plot_dir)
    for key, caption in (("tasks", "Task scores"), ("mqar", "MQAR recall"), ("agreement", "Agreement by position")):
        if key in plots:
            parts += [f"![{caption}]({os.path.relpath(plots[key], out.parent)})", ""]
    for name, d, r in zip(names, dirs, runs):
        prefix = os.path.relpath(d, out.parent).replace(os.sep, "/") + "/"
        parts += [_demote(run_markdown(r, title=name, plot_prefix=prefix)), ""]
    out.write_text("\n".join(parts))
    return out
