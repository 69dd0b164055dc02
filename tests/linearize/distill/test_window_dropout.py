"""Scheduled sliding-window dropout: a dropped layer computes exactly the layer converted with
the short window, only while training and never from a cache; the draw follows its schedule;
recipes refuse settings that cannot shorten a window; a run logs how many layers were cut."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import linearize
from linearize.distill import RecipeError, distill, load_recipe
from linearize.distill.recipe import WindowDropoutSection
from linearize.distill.window_dropout import draw_dropped_layers, dropout_rate, set_train_windows
from tests.helpers.perturb import perturb
from tests.helpers.tiny import tiny_model

CONFIGS = {
    "lolcats": dict(method="lolcats", init="baseline", gate="mamba2", window=8),
    "lolcats-paper": dict(method="lolcats", window=8),
    "liger-gla": dict(method="liger-gla", window=8),
    "lizard": dict(method="lizard", window=8),
}


def converted(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_model()
    linearize.convert(model, linearize.LinearizeConfig(**config))
    return perturb(model, seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_dropped_layer_is_the_layer_with_the_short_window(name):
    """Training forwards run without a cache (use_cache=False), as distillation's do."""
    model = converted(CONFIGS[name])
    short = copy.deepcopy(model)
    for m in linearize.mixers(short):
        m.lconfig = linearize.LinearizeConfig(**{**CONFIGS[name], "window": 2}).resolved()
    ids = torch.randint(0, 128, (2, 29))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        expected = short(ids, use_cache=False).logits
        layers = linearize.mixers(model)
        set_train_windows(layers, torch.tensor([True, True]), 2)
        assert torch.equal(model(ids, use_cache=False).logits, full), "eval mode must keep the layer's own window"
        model.train()
        cut = model(ids, use_cache=False).logits
        set_train_windows(layers, torch.tensor([True, False]), 2)
        one = model(ids, use_cache=False).logits
        set_train_windows(layers, torch.tensor([False, False]), None)
        back = model(ids, use_cache=False).logits
    torch.testing.assert_close(cut, expected, rtol=1e-5, atol=1e-5)
    assert (cut - full).abs().max() > 1e-3, "a window of 2 must change a model whose window is 8"
    assert (one - cut).abs().max() > 1e-4 and (one - full).abs().max() > 1e-4
    torch.testing.assert_close(back, full, rtol=1e-5, atol=1e-5)


def test_a_carried_decode_state_keeps_the_full_window():
    model = converted(CONFIGS["lolcats"]).train()
    set_train_windows(linearize.mixers(model), torch.tensor([True, True]), 2)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        cache = linearize.LinearizeCache(model)
        out = model(ids, cache=cache, use_cache=True).logits  # a cache: inference, whatever the mode
        set_train_windows(linearize.mixers(model), torch.tensor([False, False]), None)
        ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_the_rate_falls_linearly_and_the_draw_is_seeded():
    section = WindowDropoutSection(rate=0.8, final_rate=0.0, window=1)
    assert dropout_rate(section, 0, 11) == pytest.approx(0.8)
    assert dropout_rate(section, 5, 11) == pytest.approx(0.4)
    assert dropout_rate(section, 10, 11) == pytest.approx(0.0)
    first = draw_dropped_layers(section, 3, 11, 1000, seed=0, stage=2)
    assert torch.equal(first, draw_dropped_layers(section, 3, 11, 1000, seed=0, stage=2))
    assert not torch.equal(first, draw_dropped_layers(section, 4, 11, 1000, seed=0, stage=2))
    assert not torch.equal(first, draw_dropped_layers(section, 3, 11, 1000, seed=1, stage=2))
    assert 0.45 < first.float().mean() < 0.75  # p = 0.8 - 0.8 * 3 / 10 = 0.56
    assert not draw_dropped_layers(section, 10, 11, 1000, seed=0, stage=2).any()


@pytest.mark.parametrize("over, words", [
    ({"stage2": {"window_dropout": {"rate": 1.5}}}, "stage2.window_dropout.rate must be a probability"),
    ({"stage1": {"window_dropout": {"rate": 0.5, "window": 0}}}, "stage1.window_dropout.window must be >= 1"),
    ({"stage2": {"window_dropout": {"rate": 0.5, "window": 8}}}, "does not shorten the layers' window (8)"),
    ({"linearize": {"method": "window-sinks", "window": 8}, "stage2": {"window_dropout": {"rate": 0.5}}},
     "needs a softmax window beside a linear branch"),
])
def test_recipes_that_cannot_shorten_a_window_are_refused(write_recipe, over, words):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(**over))
    assert words in str(err.value)


def test_a_run_with_window_dropout_logs_the_cut_layers(write_recipe, tmp_path):
    path = write_recipe(linearize={"method": "lolcats", "init": "baseline", "gate": "mamba2", "window": 8},
                        stage1={"max_steps": 2, "window_dropout": {"rate": 1.0, "final_rate": 1.0, "window": 2}},
                        stage2={"max_steps": 3, "window_dropout": {"rate": 1.0, "final_rate": 0.0, "window": 2}})
    final = distill(load_recipe(path))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cut = [r["window_dropped_layers"] for r in log]
    assert len(cut) == 5 and cut[:3] == [2, 2, 2] and cut[-1] == 0  # stage 1 at p = 1; stage 2 from 1 to 0
    assert all(layer.train_window is None for layer in linearize.mixers(linearize.load(final)))
    assert json.loads((final / "config.json").read_text())["linearize"]["window"] == 8
