"""stage2.new_parameters_lr: the mixers' new parameters train in stage 2 at their own peak
learning rate (a second AdamW group under the same schedule), the LoRA at optimizer.lr; a
resumed run keeps each group's rate; bad values are refused before any work."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from linearize.distill import distill, load_recipe
from linearize.distill.recipe import OptimizerSection, RecipeError
from linearize.distill.train import apply_optimizer_settings
from linearize.state import is_new_parameter

STEPS = 3


def new_parameter_change(write_recipe, tmp_path, name: str, **stage2) -> float:
    """Largest change of a new parameter over a STEPS-step stage-2-only run (constant lr) of
    LoLCATs with init baseline, whose linear factors start at 0."""
    path = write_recipe(f"{name}.yaml", output_dir=str(tmp_path / name),
                        linearize={"method": "lolcats", "init": "baseline", "window": 8},
                        stage1={"enabled": False},
                        stage2={"max_steps": STEPS, "train_new_parameters": True,
                                "optimizer": {"lr": 1e-4, "scheduler": "constant", "warmup_ratio": 0.0}, **stage2})
    weights = load_file(str(distill(load_recipe(path)) / "model.safetensors"))
    factors = [v for k, v in weights.items() if is_new_parameter(k) and k.endswith("linearize_linear_factor")]
    assert factors, "the run must hold LoLCATs' learned linear factors"
    return max(f.abs().max().item() for f in factors)


def test_new_parameters_move_at_their_own_rate(write_recipe, tmp_path):
    """AdamW moves a parameter by at most lr per step (exactly lr on a first step): the factors
    that start at 0 stay within STEPS x 1e-4 at the LoRA's rate and go well past it at 1e-2."""
    slow = new_parameter_change(write_recipe, tmp_path, "slow")
    fast = new_parameter_change(write_recipe, tmp_path, "fast", new_parameters_lr=1e-2)
    assert 0 < slow <= STEPS * 1e-4 * (1 + 1e-3)
    assert 1e-2 * 0.99 <= fast <= STEPS * 1e-2 * (1 + 1e-3)


def test_a_resumed_optimizer_keeps_each_groups_peak_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 7.0  # what a checkpoint of another recipe held
    apply_optimizer_settings(opt, sched, OptimizerSection(lr=1e-4), [1e-4, 1e-2])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-4, 0.5e-2])
    assert sched.base_lrs == [1e-4, 1e-2] and [g["initial_lr"] for g in opt.param_groups] == [1e-4, 1e-2]


@pytest.mark.parametrize("over, message", [
    (["stage2.new_parameters_lr=0"], "stage2.new_parameters_lr must be > 0"),
    (["stage2.new_parameters_lr=1e-2", "stage2.train_new_parameters=false"],
     "stage2.new_parameters_lr is set but stage2.train_new_parameters is false"),
])
def test_bad_values_are_refused(write_recipe, over, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(), over)
