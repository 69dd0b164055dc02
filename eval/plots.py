"""The evaluation's figures: passkey heatmaps, MQAR curves, agreement by position, task bars.
Style and saving come from `linearize.plots`."""

from __future__ import annotations

from pathlib import Path

from linearize.plots import ROLE_STYLE, log2_axis, new_figure, save_figure


def plot_passkey(results: dict[str, dict], path: str | Path) -> Path:
    """Heatmaps of passkey accuracy (depth x length), one panel per role.

    results: ``{role: passkey_retrieval(...) output}``.
    """
    roles = list(results)
    fig, axes = new_figure(len(roles), width=4.4, height=3.8, layout="constrained", extra_width=1)
    for k, (ax, role) in enumerate(zip(axes, roles)):
        r = results[role]
        grid = [[r["accuracy"][i][j] for i in range(len(r["lengths"]))] for j in range(len(r["depths"]))]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(r["lengths"])), [str(x) for x in r["lengths"]], rotation=45)
        ax.set_yticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("passkey depth")
        ax.set_title(f"passkey: {role} ({r['mean_accuracy']:.0f}%)")
        for j, row in enumerate(grid):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy %")
    return save_figure(fig, path)  # constrained layout: saved as laid out


def plot_mqar(curves: dict[str, dict], path: str | Path) -> Path:
    """Recall accuracy vs number of key-value pairs, one line per curve.

    curves: ``{label: mqar_accuracy(...) output}``; labels "teacher"/"student" get fixed styles.
    """
    fig, (ax,) = new_figure(1, width=5.5, height=3.8)
    for label, r in curves.items():
        ax.plot(r["num_pairs"], r["accuracy"], label=label, **ROLE_STYLE.get(label, dict(marker="o")))
    log2_axis(ax, sorted({n for r in curves.values() for n in r["num_pairs"]}))
    ax.set_ylim(-2, 102)
    ax.set_xlabel("key-value pairs in context")
    ax.set_ylabel("recall accuracy %")
    ax.set_title("MQAR associative recall")
    ax.legend()
    return save_figure(fig, path)


def plot_agreement(agreements: dict[str, dict], path: str | Path) -> Path:
    """Top-1 agreement and KL to the teacher vs token position, one line per run."""
    fig, (a1, a2) = new_figure(2, width=5, height=3.6)
    for label, r in agreements.items():
        xs = [(i + 0.5) * r["bin_size"] for i in range(len(r["kl_by_position"]))]
        a1.plot(xs, r["agreement_by_position"], marker=".", label=label)
        a2.plot(xs, r["kl_by_position"], marker=".", label=label)
    a1.set_ylabel("top-1 agreement %")
    a2.set_ylabel("KL(teacher || student), nats")
    for ax in (a1, a2):
        ax.set_xlabel("token position")
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_title("agreement with the teacher")
    a2.set_title("divergence from the teacher")
    return save_figure(fig, path)


def plot_tasks(rows: dict[str, dict[str, float]], path: str | Path, ylabel: str = "score %") -> Path:
    """Grouped bars: ``rows = {task: {series: value}}`` (e.g. series teacher, student)."""
    tasks = list(rows)
    series = []
    for t in tasks:
        for s in rows[t]:
            if s not in series:
                series.append(s)
    width = 0.8 / max(1, len(series))
    fig, (ax,) = new_figure(1, width=max(5, 1.3 * len(tasks) + 2), height=3.8)
    for k, s in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(tasks))]
        ys = [rows[t].get(s, float("nan")) for t in tasks]
        style = ROLE_STYLE.get(s, {})
        ax.bar(xs, ys, width, label=s, color=style.get("color"))
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
