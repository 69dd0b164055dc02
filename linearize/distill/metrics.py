"""What a run measures and writes: the JSONL metrics log, held-out perplexity during
training, the stage-1 per-layer summary and the PNG of it all."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from .checkpointing import write_atomic
from .recipe import DataSection, EvalSection, RecipeError


class MetricsLog:
    """One JSON object per line, each with `stage` and `step`.

    Training records (one per logged optimizer step): loss, lr, grad_norm, tokens, tokens_per_s,
    elapsed_s, stage 2's ce and kl, stage 1's layer_mse ({layer index: MSE averaged over the
    steps since the previous record}). Evaluation records (no `loss` key): tokens (the
    stage's), run_tokens (all stages'), eval_ppl, eval_nll, eval_tokens, eval_s, and in stage 1
    eval_layer_mse ({layer index: MSE on the held-out texts}, see `train.heldout_layer_mse`).
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.sinks: list = []  # called with each record logged (the experiment trackers)

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
        for sink in self.sinks:
            sink(record)


# -- held-out perplexity ----------------------------------------------------------------------
def load_eval_texts(section: EvalSection) -> list[str]:
    """The first `section.texts` held-out texts: the embedded held-out Wikipedia summaries
    (`linearize.eval.heldout`, the slice `linearize eval` scores) or a local file's records."""
    from .data import DataError, detect_format, load_documents

    if section.source is None:
        from ..assets import MissingAssetError
        from ..eval.heldout import HELDOUT_SIZE, heldout_texts

        if section.texts > HELDOUT_SIZE:
            raise RecipeError(f"eval.texts {section.texts} is above the {HELDOUT_SIZE} embedded held-out summaries: "
                              f"lower it to <= {HELDOUT_SIZE} or set eval.source to a file")
        try:
            return heldout_texts(section.texts)
        except MissingAssetError as e:
            raise DataError(f"eval.source is null (the embedded held-out summaries) but {e}; or set eval.source") from e
    data = DataSection(source=section.source, format="text", text_field=section.text_field)
    try:
        ds = load_documents(data)
        _, field = detect_format(ds.column_names, data)
    except DataError as e:
        raise _eval_error(e) from e
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()][:section.texts]
    if not texts:
        raise DataError(f"eval.source {section.source} holds no text in field {field!r}")
    return texts


def _eval_error(e: Exception):
    from .data import DataError

    return DataError(f"eval.source: {e}".replace("data.source", "eval.source").replace("data.name", "eval.source")
                     .replace("data.text_field", "eval.text_field"))


def check_eval_source(section: EvalSection) -> None:
    """`data.check_source` for eval.source (local files there, a hub id resolvable, offline from
    the cache), before the tokenizer or the model loads; the embedded text is checked later."""
    from .data import DataError, check_source

    if section.source is None:
        return
    try:
        check_source(DataSection(source=section.source, format="text", text_field=section.text_field))
    except DataError as e:
        raise _eval_error(e) from e


@contextlib.contextmanager
def evaluating(model):
    """Eval mode without gradients for the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


class HeldoutPerplexity:
    """Held-out perplexity of the student at fixed token counts (the recipe's `eval:`).

    Uses `linearize.eval.perplexity.perplexity` on the same texts every time, so the values
    are comparable across steps and with `linearize eval` at the same window and stride.
    """

    def __init__(self, section: EvalSection, tokenizer, seq_len: int):
        self.section = section
        self.tokenizer = tokenizer
        self.window = section.seq_len or seq_len
        self.stride = section.stride or max(1, self.window // 2)
        if self.stride >= self.window:
            raise RecipeError(f"eval.stride {self.stride} must be below the perplexity window {self.window} "
                              "(eval.seq_len, or the recipe's seq_len): lower eval.stride")
        self._texts: list[str] | None = None

    def enabled(self, stage: int) -> bool:
        return self.section.every_tokens is not None and stage in self.section.stages

    def due(self, stage: int, tokens_before: int, tokens_after: int, last: bool) -> bool:
        """Whether the step that took the stage from tokens_before to tokens_after evaluates."""
        if not self.enabled(stage):
            return False
        every = self.section.every_tokens
        return last or tokens_after // every > tokens_before // every

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = load_eval_texts(self.section)
        return self._texts

    def __call__(self, model) -> dict:
        """Perplexity of `model` in eval mode without gradients; its train/eval mode is restored.

        Returns `linearize.eval.perplexity.perplexity`'s dict (perplexity, mean_nll, tokens, ...).
        """
        from ..eval.perplexity import perplexity

        texts = self.texts()
        with evaluating(model):
            return perplexity(model, self.tokenizer, texts, self.window, self.stride, self.section.batch_size)


# -- stage-1 per-layer summary ----------------------------------------------------------------
def layer_mse_records(records: list[dict]) -> list[dict]:
    """Stage-1 training records that carry per-layer MSE, in log order."""
    return [r for r in records if r.get("stage") == 1 and r.get("layer_mse")]


def heldout_layer_mse_records(records: list[dict]) -> list[dict]:
    """Stage-1 evaluation records that carry the held-out per-layer MSE, in log order."""
    return [r for r in records if r.get("stage") == 1 and r.get("eval_layer_mse")]


def layer_mse_measurements(records: list[dict]) -> tuple[list[dict], str, str]:
    """(records, their per-layer key, what they measure) of stage 1's per-layer MSE: the
    held-out evaluations when there are at least two, else the training records."""
    held = heldout_layer_mse_records(records)
    if len(held) >= 2:
        return held, "eval_layer_mse", "held-out"
    return layer_mse_records(records), "layer_mse", "training-row"


def layer_mse_summary(records: list[dict]) -> str | None:
    """One line: each layer's stage-1 MSE at the first vs the last measurement, and how many
    layers dropped by at least half (None without per-layer records).

    The held-out measurements (`eval_layer_mse`, the same text each time) when stage 1
    evaluated at least twice; else the first vs the last training interval, whose rows differ,
    so a layer's drop there mixes learning with the rows' own difficulty.
    """
    rs, key, what = layer_mse_measurements(records)
    if not rs:
        return None
    first, last = rs[0][key], rs[-1][key]
    layers = [k for k in first if k in last]
    halved = sum(1 for k in layers if last[k] <= 0.5 * first[k])
    pairs = ", ".join(f"L{k} {first[k]:.3g}->{last[k]:.3g}" for k in layers)
    return (f"stage 1 {what} per-layer MSE, steps {rs[0]['step']} -> {rs[-1]['step']}: {pairs}; "
            f"{halved}/{len(layers)} layers dropped by at least half")


# -- the PNG ----------------------------------------------------------------------------------
def plot_panels(records: list[dict]) -> list[tuple[str, int | None]]:
    """The panels `plot_losses` draws for these records, in order: ("loss", stage) per stage
    with training records, ("layer_mse", None) when stage 1 logged per-layer MSE, ("ppl", None)
    when held-out perplexity was evaluated."""
    panels: list[tuple[str, int | None]] = [("loss", s) for s in sorted({r["stage"] for r in records if "loss" in r})]
    if layer_mse_measurements(records)[0]:
        panels.append(("layer_mse", None))
    if any("eval_ppl" in r for r in records):
        panels.append(("ppl", None))
    return panels


def _loss_panel(ax, records: list[dict], stage: int) -> None:
    titles = {1: "stage 1: attention transfer (layer MSE)", 2: "stage 2: LoRA (loss)"}
    rs = [r for r in records if r["stage"] == stage and "loss" in r]
    ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], lw=1.2)
    ax.set_title(titles.get(stage, f"stage {stage}"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if stage == 1 and all(r["loss"] > 0 for r in rs):
        ax.set_yscale("log")


def _layer_mse_panel(ax, records: list[dict]) -> None:
    rs, key, what = layer_mse_measurements(records)
    first, last = rs[0], rs[-1]
    layers = [k for k in first[key] if k in last[key]]
    x = list(range(len(layers)))
    when = "step" if key == "eval_layer_mse" else "interval to step"
    ax.bar([i - 0.2 for i in x], [first[key][k] for k in layers], width=0.4, label=f"{when} {first['step']}")
    ax.bar([i + 0.2 for i in x], [last[key][k] for k in layers], width=0.4, label=f"{when} {last['step']}")
    ax.set_xticks(x, layers, fontsize=7 if len(layers) > 16 else None)
    ax.set_title(f"stage 1: {what} MSE per linearized layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("MSE")
    if all(v > 0 for r in (first, last) for v in r[key].values()):
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _ppl_panel(ax, records: list[dict]) -> None:
    rs = [r for r in records if "eval_ppl" in r and math.isfinite(r["eval_ppl"])]
    for stage in sorted({r["stage"] for r in rs}):
        pts = [r for r in rs if r["stage"] == stage]
        ax.plot([r["run_tokens"] for r in pts], [r["eval_ppl"] for r in pts], marker="o", ms=3, label=f"stage {stage}")
    ax.set_title("held-out perplexity")
    ax.set_xlabel("training tokens (both stages)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """The run's PNG (matplotlib Agg), written atomically: loss against step per stage, the
    stage-1 per-layer MSE (first vs last interval) and held-out perplexity against tokens,
    each panel when its records exist (see `plot_panels`)."""
    panels = plot_panels(records)
    if not panels:
        return None
    from ..plots import new_figure, save_figure  # matplotlib: only when a plot is drawn

    cols = min(len(panels), 2)
    fig, axes = new_figure(cols, width=6, height=4, nrows=math.ceil(len(panels) / cols))
    draw = {"loss": lambda ax, stage: _loss_panel(ax, records, stage),
            "layer_mse": lambda ax, _: _layer_mse_panel(ax, records),
            "ppl": lambda ax, _: _ppl_panel(ax, records)}
    for ax, (kind, arg) in zip(axes, panels):
        draw[kind](ax, arg)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return save_figure(fig, path, dpi=100)
