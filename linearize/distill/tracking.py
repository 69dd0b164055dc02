"""Experiment trackers for `linearize distill`: the recipe's `log_with` (tensorboard, wandb)
through accelerate, fed the same records as the JSONL metrics log.

`Accelerator(log_with=..., project_dir=output_dir/trackers)`, `init_trackers(tracker_project,
config=the flattened recipe)`, one `accelerator.log` per metrics record and `end_training` when
the run stops. Scalars are named `stage<k>/<key>` (`stage1/layer_mse/<layer>` for the
per-layer MSE); the step is the run's optimizer step (stage 2 continues after stage 1's).
"""
from __future__ import annotations

import json
from pathlib import Path

from .recipe import Recipe, flatten_sections

TRACKER_DIR = "trackers"


def accelerator_kwargs(recipe: Recipe) -> dict:
    """The `Accelerator` keywords for the recipe's trackers ({} when it names none)."""
    if not recipe.log_with:
        return {}
    return {"log_with": list(recipe.log_with), "project_dir": str(Path(recipe.output_dir) / TRACKER_DIR)}


def tracker_config(recipe: Recipe) -> dict[str, bool | int | float | str]:
    """The recipe as flat `section.key` scalars (lists, mappings and null as JSON text)."""
    flat = flatten_sections(recipe.to_dict())
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}


def tracker_values(record: dict) -> dict[str, float]:
    """The numbers of one metrics record, named `stage<k>/<key>` (nested mappings one level down)."""
    prefix, values = f"stage{record['stage']}/", {}
    for key, value in record.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if key not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                values[prefix + key + (f"/{sub}" if sub is not None else "")] = v
    return values


class Trackers:
    """The run's trackers: `start` after the checks, `log(record)` per metrics record, `end`."""

    def __init__(self, accelerator, recipe: Recipe):
        self.accelerator = accelerator
        self.recipe = recipe
        self.started = False
        self.offsets = {1: 0, 2: 0}  # steps before each stage (stage 2: stage 1's steps)

    def start(self) -> None:
        if self.recipe.log_with and not self.started:
            self.accelerator.init_trackers(self.recipe.tracker_project, config=tracker_config(self.recipe))
            self.started = True

    def log(self, record: dict) -> None:
        values = tracker_values(record) if self.started else {}
        if values:
            self.accelerator.log(values, step=self.offsets.get(record["stage"], 0) + record["step"])

    def end(self) -> None:
        if self.started:
            self.accelerator.end_training()
            self.started = False
