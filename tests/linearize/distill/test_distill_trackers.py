"""Watchable training (#13 item 4): the recipe's log_with feeds accelerate's trackers the
same metrics as metrics.jsonl; a tracker that is not installed is refused at validation."""
import importlib.util
import json

import pytest

from linearize.distill.recipe import RecipeError, load_recipe
from linearize.distill.tracking import tracker_config, tracker_values


def scalars(folder):
    """{tag: [(step, value)]} of every TensorBoard event file under folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_the_jsonl_metrics(write_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from linearize.distill import distill

    recipe = load_recipe(write_recipe(log_with="tensorboard", eval={"every_tokens": 64, "texts": 2, "seq_len": 32}))
    assert recipe.log_with == ["tensorboard"]
    distill(recipe)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(tmp_path / "run" / "trackers" / "linearize-distill")
    s1 = max(r["step"] for r in records if r["stage"] == 1)
    for r in records:
        for tag, value in tracker_values(r).items():
            step = r["step"] + (s1 if r["stage"] == 2 else 0)
            assert (step, pytest.approx(value, rel=1e-6)) in logged[tag], (tag, step, logged.get(tag))
    assert {"stage1/loss", "stage1/layer_mse/0", "stage1/layer_mse/1", "stage2/loss", "stage2/ce", "stage2/kl",
            "stage1/eval_ppl", "stage2/eval_ppl", "stage1/lr", "stage2/tokens_per_s"} <= set(logged)
    hparams = list((tmp_path / "run" / "trackers").rglob("hparams.yml"))
    assert hparams and "stage2.optimizer.lr" in hparams[0].read_text()


def test_record_values_and_config_are_flat_scalars():
    rec = {"stage": 1, "step": 3, "loss": 0.5, "grad_norm": None, "layer_mse": {"0": 0.1, "1": 0.2},
           "resume_changes": {"stage1.optimizer.lr": [1e-2, 1e-3]}}
    assert tracker_values(rec) == {"stage1/loss": 0.5, "stage1/layer_mse/0": 0.1, "stage1/layer_mse/1": 0.2}
    config = tracker_config(load_recipe(None))
    assert config["stage1.optimizer.lr"] == 1e-2 and config["linearize.method"] == "liger-gla"
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())


def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match="log_with names wandb, which is not installed: pip install wandb"):
        load_recipe(None, ["log_with=[wandb]"])
    with pytest.raises(RecipeError, match="log_with must be one of tensorboard, wandb, got 'mlflow'"):
        load_recipe(None, ["log_with=mlflow"])
    assert load_recipe(None).log_with == []
