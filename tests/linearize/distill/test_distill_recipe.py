"""Recipe schema: YAML + dotted overrides, types, and clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from linearize import LinearizeConfig
from linearize.distill import Recipe, RecipeError, load_recipe
from linearize.distill.recipe import flatten_sections, flatten_with_defaults

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def test_defaults_and_overrides_are_typed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seq_len: 64\nstage2:\n  optimizer: {lr: 1e-4}\n  lora: {target_modules: [q_proj]}\n")
    r = load_recipe(p, ["stage1.optimizer.lr=1e-2", "batch_size=2", "stage2.lora.target_modules=q_proj,v_proj",
                        "linearize.method=lolcats", "linearize.window=16", "model.path=null", "stage2.kd_ratio=1"])
    assert isinstance(r, Recipe)
    assert r.seq_len == 64 and r.batch_size == 2
    assert r.stage1.optimizer.lr == pytest.approx(1e-2) and r.stage2.optimizer.lr == pytest.approx(1e-4)
    assert r.stage2.lora.target_modules == ["q_proj", "v_proj"]
    assert r.linearize == LinearizeConfig(method="lolcats", window=16)
    assert r.model.path is None and r.stage2.kd_ratio == 1.0
    assert load_recipe(None).stage2.lora.r == 8 and load_recipe(None).stage2.lora.alpha == 16


def test_a_saved_recipe_reads_as_the_typed_one():
    """A recipe.yaml that names only some linearize fields (as runs before the section was typed
    saved it) flattens to what the typed recipe does, so a resume sees no change; a null section
    keeps none of its defaults."""
    typed = flatten_sections(load_recipe(None, ["linearize.method=lizard", "seq_len=64"]).to_dict())
    assert flatten_with_defaults({"linearize": {"method": "lizard"}, "seq_len": 64}) == typed
    assert typed["linearize.window"] is None and typed["linearize.method"] == "lizard"
    bare = flatten_with_defaults({"linearize": None})
    assert bare["linearize"] is None and not any(k.startswith("linearize.") for k in bare)
    assert bare == flatten_sections(load_recipe(None, ["linearize=null"]).to_dict())


def test_head_level_hybrid_heads_are_a_recipe_mapping(tmp_path):
    """linearize.full_attention_heads is {layer: [KV heads]} in YAML (as select-heads prints it
    for the CLI), string keys from JSON read as the same layers, and the saved recipe reads back."""
    p = tmp_path / "r.yaml"
    p.write_text("linearize:\n  method: lolcats\n  full_attention_heads: {7: [2, 1], 3: [0]}\n")
    r = load_recipe(p)
    assert r.linearize.full_attention_heads == {3: [0], 7: [1, 2]}
    p.write_text(r.to_yaml())
    assert load_recipe(p).linearize == r.linearize
    assert load_recipe(None, ["linearize.method=lolcats", "linearize.full_attention_heads={'3': [0]}"]
                       ).linearize.full_attention_heads == {3: [0]}
    for bad, message in (("[3, 0]", "full_attention_heads must be a mapping of int to list"),
                         ("{3: zero}", r"full_attention_heads\[3\] must be a list of int"),
                         ("{x: [0]}", "full_attention_heads key 'x' must be an integer")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, ["linearize.method=lolcats", f"linearize.full_attention_heads={bad}"])


@pytest.mark.parametrize("override, message", [
    ("seq_len=abc", "seq_len must be an integer"),
    ("stage1.optimizer.lrr=1", "unknown recipe key stage1.optimizer.lrr"),
    ("bogus=1", "unknown recipe key bogus"),
    ("seq_len.x=1", "is a value, not a section"),
    ("resume=maybe", "resume must be true or false"),
    ("stage2.kd_ratio=2", "kd_ratio must be in [0, 1]"),
    ("data.format=csv", "data.format must be one of"),
    ("linearize.method=mamba", "unknown method 'mamba'"),
    ("linearize.windw=3", "unknown recipe key linearize.windw \\(did you mean window\\?\\)"),
    ("data.boundaries=positions", "needs batch_size=1"),
    ("noequals", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    extra = ["batch_size=2"] if "boundaries" in override else []
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(None, extra + [override])


def test_bad_yaml_keys_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage1:\n  optimiser: {lr: 1}\n")
    with pytest.raises(RecipeError, match="unknown recipe key.*stage1.optimiser"):
        load_recipe(p)
    p.write_text("stage1: 3\n")
    with pytest.raises(RecipeError, match="stage1 must be a mapping"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.stage1.enabled or r.stage2.enabled


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"smollm2-cpu-liger.yaml", "smollm2-cpu-lizard.yaml", "llama3-8b-liger-gla.yaml", "llama3-8b-lizard.yaml",
            "llama3-8b-lolcats.yaml"} <= names
    assert {p.name for p in (RECIPES / "accelerate").glob("*.yaml")} >= {"single_gpu.yaml", "ddp_8gpu.yaml", "fsdp_8gpu.yaml"}


def test_print_recipe_entry_point(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seq_len: 48\n")
    out = subprocess.run([sys.executable, "-m", "linearize.distill", str(p), "batch_size=3", "--print-recipe"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "seq_len: 48" in out.stdout and "batch_size: 3" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "linearize.distill", str(p), "seq_len=x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "seq_len must be an integer" in bad.stderr
