"""The one place for figures: the teacher/student style and the helpers every PNG of the
project is drawn with (matplotlib, Agg backend, no display needed). Used by the training
curves of `linearize distill`, the evaluation plots, the benchmarks and the results scripts.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

ROLE_STYLE = {"teacher": dict(color="tab:gray", linestyle="--", marker="o"),
              "student": dict(color="tab:blue", linestyle="-", marker="s")}


def new_figure(ncols: int, width: float = 5.2, height: float = 3.8, nrows: int = 1, layout: str | None = None,
               extra_width: float = 0.0):
    """(figure, axes): `nrows` x `ncols` panels of `width` x `height` inches each (plus
    `extra_width` inches, e.g. for a colour bar), the axes as one flat list in row order.
    `layout` is matplotlib's layout engine ("constrained"); None lays out tight when saved."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + extra_width, height * nrows), squeeze=False,
                             layout=layout)
    return fig, list(axes.flat)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG at `path` (parents created; replaced atomically, so a reader never
    sees half a file) and close it. Laid out tight unless the figure has its own layout engine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def log_y(ax) -> None:
    """Log-scale y axis labelled with plain numbers at 1, 2, 5 x 10^k."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def log2_axis(ax, ticks: list[int]) -> None:
    """Log-2 x axis with a tick at each of `ticks` (1024 and its multiples written 1k, 2k, ...)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_roles(rows: list[dict], path: str | Path, x: str, xlabel: str, panels: list[tuple], label: str = "{role}"):
    """Teacher beside student: one panel per `(value, ylabel, title, yscale)` in `panels`, each a
    line per role of `value(row)` against `row[x]` on a log-2 axis (rows carry a "role").
    yscale: "log" (`log_y`), "zero" (linear from 0) or None. Returns the PNG's path."""
    fig, axes = new_figure(len(panels))
    for role, style in ROLE_STYLE.items():
        mine = sorted((r for r in rows if r["role"] == role), key=lambda r: r[x])
        for ax, (value, *_) in zip(axes, panels):
            ax.plot([r[x] for r in mine], [value(r) for r in mine], label=label.format(role=role), **style)
    for ax, (_, ylabel, title, yscale) in zip(axes, panels):
        if yscale == "log":
            log_y(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        log2_axis(ax, sorted({r[x] for r in rows}))
        ax.set_xlabel(xlabel)
        if yscale == "zero":
            ax.set_ylim(bottom=0)
        ax.legend()
    return save_figure(fig, path)
