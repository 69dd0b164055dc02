"""One distillation run in bf16 (`model.dtype: bfloat16`, the README's headline setting): both
stages run, every logged loss is finite, and the step changed what it trains."""
from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import linearize
from linearize.distill import distill, load_recipe


def test_bf16_run_gives_finite_losses_and_updates_what_it_trains(write_recipe, assets, tmp_path):
    """Stage 1 (lizard: Hedgehog maps, scalar gate, sink logits, branch weights) and stage 2
    (LoRA on q/v, KD 0.5) for two steps each on a bf16 model. Guards: the new parameters
    train in fp32 beside bf16 weights (a bf16 Adam step of lr 1e-2 on values near 1 would be
    lost to rounding), the losses stay finite, the frozen weights stay bit for bit the bf16
    source, and the final model holds the trained values (rounded to bf16: an update below
    one bf16 step, e.g. 0.02 on a sink logit of -5, is kept only in the fp32 checkpoint)."""
    recipe = write_recipe(model={"path": str(assets / "model"), "dtype": "bfloat16"}, save_adapter=True,
                          stage2={"max_steps": 2, "kd_ratio": 0.5, "optimizer": {"lr": 1e-3}})
    final = distill(load_recipe(recipe, []))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log), log
    assert all(math.isfinite(r["ce"]) and math.isfinite(r["kl"]) for r in log if r["stage"] == 2), log

    source = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.bfloat16)
    linearize.convert(source, method="lizard", window=8)
    init = dict(linearize.new_parameters(source))
    ck = tmp_path / "run" / "checkpoints"
    stage1 = load_file(str(ck / "stage1-step0000002" / "params.safetensors"))
    assert set(stage1) == set(init) and all(v.dtype == torch.float32 for v in stage1.values())
    unchanged = [k for k in init if torch.equal(stage1[k], init[k].float())]
    assert not unchanged, f"stage 1 left these new parameters at their initial values: {unchanged}"
    stage2 = load_file(str(ck / "stage2-step0000002" / "params.safetensors"))
    saved = load_file(str(final / "model.safetensors"))
    for k in init:  # the final model holds what trained, in the model's dtype
        assert torch.equal(saved[k], stage2[k].to(torch.bfloat16)), k
    original = source.state_dict()
    for k, v in saved.items():
        if k not in init:
            assert v.dtype == torch.bfloat16 and torch.equal(v, original[k]), f"frozen weight {k} changed"

    lora = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    b = {k: v for k, v in lora.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values()), "stage 2 left a LoRA B matrix at zero"
    student = linearize.load(final, adapter=final / "adapter")
    with torch.no_grad():
        logits = student(torch.randint(3, 100, (1, 24))).logits
    assert torch.isfinite(logits).all()
