"""Distillation through the head-level hybrid: a folder converted with full-attention heads
trains through both stages (recipe `linearize: null`) and keeps the choice.

The recipe's `linearize:` section has no dict-valued keys, so `full_attention_heads` is set at
conversion (`linearize convert --full-attention-heads`), not in the recipe."""
from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.distill import distill, load_recipe
from linearize.state import linearize_state


def test_both_stages_train_with_full_attention_heads(write_recipe, assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    linearize.convert(model, method="lizard", window=8, full_attention_heads={1: [0]})
    model.save_pretrained(tmp_path / "converted")
    (tmp_path / "converted").joinpath("tokenizer.json").write_bytes((assets / "model" / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (assets / "model" / name).exists():
            (tmp_path / "converted" / name).write_bytes((assets / "model" / name).read_bytes())
    final = distill(load_recipe(write_recipe(model={"path": str(tmp_path / "converted")}, linearize=None,
                                         stage1={"max_steps": 1}, stage2={"max_steps": 1}), []))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (2, 1)]
    assert all(math.isfinite(r["loss"]) for r in log)
    trained = linearize.load(final)
    assert linearize_state(trained).config.full_attention_heads == {1: [0]}
    assert [m.full_heads for m in linearize.mixers(trained)] == [[], [0]]
    assert torch.isfinite(trained(torch.randint(3, 100, (1, 24))).logits).all()
