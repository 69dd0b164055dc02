"""stage2.gradient_checkpointing: the layers really are recomputed in the backward pass, the
gradients are the ones without it, and a run trains the same weights with it as without."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import linearize
from linearize.distill import distill, load_recipe
from linearize.distill.recipe import Recipe
from linearize.distill.train import apply_lora, set_gradient_checkpointing
from tests.helpers.perturb import perturb
from tests.helpers.tiny import tiny_model

CONFIGS = {
    "lolcats": dict(method="lolcats", init="baseline", gate="mamba2", window=8),
    "lizard": dict(method="lizard", window=8, softmax_layers=[1]),
    "gated-deltanet": dict(method="gated-deltanet", window=8),
}


def lora_student(config: dict):
    torch.manual_seed(0)
    model = tiny_model()
    linearize.convert(model, linearize.LinearizeConfig(**config))
    model = perturb(model, 0)
    model.config.use_cache = False
    recipe = Recipe()
    recipe.stage2.train_new_parameters = True
    torch.manual_seed(1)
    peft_model = apply_lora(model, recipe)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts at B = 0: give it a value so its gradient path is tested
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train()


def gradients(model, ids) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the next-token loss and how many times the mixers ran forward."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linearize.mixers(model)]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpointed_gradients_equal_the_plain_ones(name):
    model = lora_student(CONFIGS[name])
    ids = torch.randint(0, 128, (2, 37))
    plain, plain_calls = gradients(model, ids)
    set_gradient_checkpointing(model, True)
    checkpointed, ckpt_calls = gradients(model, ids)
    set_gradient_checkpointing(model, False)
    again, again_calls = gradients(model, ids)
    layers = len(linearize.mixers(model))
    assert plain_calls == again_calls == layers and ckpt_calls == 2 * layers, "each layer must run again in backward"
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    assert any(".linearize_" in n for n in plain), "the mixers' new parameters must get gradients too"
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
        assert torch.equal(again[n], plain[n]), n


def test_a_run_trains_the_same_weights_with_checkpointing(write_recipe, tmp_path):
    finals = []
    for on in (False, True):
        path = write_recipe(f"recipe-{on}.yaml", output_dir=str(tmp_path / f"run-{on}"),
                            stage2={"max_steps": 2, "train_new_parameters": True, "gradient_checkpointing": on})
        recipe = load_recipe(path)
        assert recipe.stage2.gradient_checkpointing is on
        finals.append(load_file(str(distill(recipe) / "model.safetensors")))
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6, msg=k)
