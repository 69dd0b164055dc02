"""The run's JSONL metrics log and its PNG loss curve."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpointing import write_atomic


class MetricsLog:
    """One JSON object per optimizer step: stage, step, loss, lr, grad_norm, tokens, tokens_per_s."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is discarded
        return out

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop records logged after (stage, step), the point a resumed run continues from."""
        if not self.enabled:
            return
        keep = [r for r in self.records() if (r["stage"], r["step"]) <= (stage, step)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """Loss against step, one panel per stage, written as a PNG (matplotlib Agg)."""
    stages = sorted({r["stage"] for r in records})
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {1: "stage 1: attention transfer (sum of layer MSE)", 2: "stage 2: LoRA (loss)"}
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rs = [r for r in records if r["stage"] == stage]
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], lw=1.2)
        ax.set_title(titles.get(stage, f"stage {stage}"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if stage == 1 and all(r["loss"] > 0 for r in rs):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
