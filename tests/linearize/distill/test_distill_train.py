"""In-process runs on a tiny model: both stages, frozen weights, stage-1 progress, bad runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.distill import DistillError, RecipeError, distill, load_recipe
from linearize.distill.cli_commands import run_distill
from linearize.mixers import AttentionTransfer


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run(path: Path, *overrides: str) -> Path:
    return distill(load_recipe(path, list(overrides)))


def test_both_stages_run_and_frozen_weights_stay_bit_identical(write_recipe, assets, tmp_path):
    final = run(write_recipe(stage2={"max_steps": 2, "kd_ratio": 0.5, "optimizer": {"lr": 1e-3}}, save_adapter=True))
    out = tmp_path / "run"
    log = read_log(out)
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert all(r["kl"] >= 0 and math.isfinite(r["ce"]) for r in log if r["stage"] == 2)
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "stage2-step0000002"

    original = load_file(str(assets / "model" / "model.safetensors"))
    saved = load_file(str(final / "model.safetensors"))
    new = {k for k in saved if ".linearize_" in k}
    assert new and set(saved) - new == set(original)
    for k, v in original.items():
        assert torch.equal(saved[k], v), f"frozen weight {k} changed"
    fresh = AutoModelForCausalLM.from_pretrained(assets / "model")
    linearize.convert(fresh, linearize.LinearizeConfig(method="lizard", window=8))
    init = dict(linearize.new_parameters(fresh))
    assert any(not torch.equal(saved[k], init[k]) for k in new), "stage 1 did not train the new parameters"

    card = (final / "README.md").read_text()
    assert "Distilled by `linearize distill`" in card and "stage 1 2 steps, stage 2 2 steps" in card

    model = linearize.load(final, adapter=final / "adapter")
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    ids = torch.randint(3, 100, (1, 24))
    assert torch.isfinite(model(ids).logits).all()


def test_parameter_free_method_skips_stage1_and_merges_lora(write_recipe, assets, tmp_path, capsys):
    final = run(write_recipe(linearize={"method": "liger-gla", "window": 8}, stage2={"max_steps": 2}))
    assert "stage 1 skipped: liger-gla has no new parameters" in capsys.readouterr().out
    assert [(r["stage"], r["step"]) for r in read_log(tmp_path / "run")] == [(2, 1), (2, 2)]
    model = linearize.load(final)
    assert linearize.is_linearized(model) and not any("lora" in n for n, _ in model.named_parameters())
    original = load_file(str(assets / "model" / "model.safetensors"))
    merged = dict(model.named_parameters())
    for k, v in original.items():
        changed = not torch.equal(merged[k], v)
        assert changed == any(t in k for t in ("q_proj", "k_proj", "v_proj")), k


def transfer_mse(model, ids: torch.Tensor) -> float:
    t = AttentionTransfer()
    for m in linearize.mixers(model):
        m.transfer = t
    with torch.no_grad():
        model(ids, use_cache=False)
    for m in linearize.mixers(model):
        m.transfer = None
    return float(torch.stack(t.losses).sum())


def test_stage1_lowers_the_attention_mse(write_recipe, assets):
    final = run(write_recipe(seq_len=48, stage1={"max_steps": 24, "optimizer": {"lr": 2e-2}}, stage2={"enabled": False}))
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (2, 48))
    before = AutoModelForCausalLM.from_pretrained(assets / "model")
    linearize.convert(before, linearize.LinearizeConfig(method="lizard", window=8))
    after = linearize.load(final)
    mse0, mse1 = transfer_mse(before, ids), transfer_mse(after, ids)
    print("attention MSE before / after stage 1:", mse0, mse1)
    assert mse1 < 0.7 * mse0, (mse0, mse1)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(write_recipe, tmp_path, monkeypatch):
    import linearize.distill.train as train

    calls = []
    real = train.transfer_loss

    def poisoned(*args):
        calls.append(1)
        loss, per_layer = real(*args)
        return (loss * float("nan") if len(calls) == 4 else loss), per_layer

    monkeypatch.setattr(train, "transfer_loss", poisoned)
    path = write_recipe(stage1={"max_steps": 6}, stage2={"enabled": False}, checkpoint_every=2)
    with pytest.raises(DistillError, match=r"stage 1 step 4: the loss is nan\. Stopped before updating the weights; "
                                           r"the last good checkpoint is .*stage1-step0000002 \(resume=true"):
        run(path)
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "stage1-step0000002"
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    monkeypatch.setattr(train, "transfer_loss", real)
    run(path, "resume=true")
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_run_errors_name_the_fix(write_recipe, tmp_path, capsys):
    import argparse

    bad_len = write_recipe("long.yaml", seq_len=512, linearize={"method": "lizard", "window": 8, "softmax_layers": [1]})
    with pytest.raises(RecipeError, match="above the model's max_position_embeddings 256.*lower seq_len"):
        run(bad_len)
    with pytest.raises(RecipeError, match="data file .* does not exist"):
        run(write_recipe("nodata.yaml", data={"source": str(tmp_path / "missing.jsonl")}))
    done = write_recipe("ok.yaml", linearize={"method": "liger-gla"}, stage2={"max_steps": 1})
    run(done)
    with pytest.raises(DistillError, match="already holds a run.*resume=true"):
        run(done)
    with pytest.raises(DistillError, match="the recipe changed since this run started.*seq_len"):
        run(done, "resume=true", "seq_len=16")
    code = run_distill(argparse.Namespace(recipe=str(done), overrides=["stage2.lora.target_modules=[nope]",
                                                                         "output_dir=" + str(tmp_path / "other")],
                                          print_recipe=False))
    assert code == 2 and "target_modules" in capsys.readouterr().err


def test_a_crash_while_saving_leaves_latest_on_the_previous_checkpoint(write_recipe, tmp_path, kill_on_save):
    restore = kill_on_save(2)
    path = write_recipe(stage1={"max_steps": 6}, stage2={"enabled": False}, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(path)
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "stage1-step0000002"
    assert (ck / ".tmp-stage1-step0000004").is_dir() and not (ck / "stage1-step0000004").exists()
    restore()
    run(path, "resume=true")
    assert not any(p.name.startswith(".tmp-") for p in ck.iterdir())
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_a_model_saved_with_a_sparse_cache_trains_without_it_and_keeps_it(write_recipe, assets, tmp_path):
    """The cache has no gradient: distill turns it off for training and `final` carries it again."""
    source = tmp_path / "lolcats-sparse"
    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    linearize.convert(model, method="lolcats", window=8, init="baseline", sparse_cache=6, sparse_block=4)
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(assets / "model").save_pretrained(source)
    final = run(write_recipe(model={"path": str(source)}, linearize=None, stage1={"enabled": False}))
    saved = linearize.load(final)
    assert (saved.config.linearize["sparse_cache"], saved.config.linearize["sparse_block"]) == (6, 4)
    assert [r["stage"] for r in read_log(tmp_path / "run")] == [2, 2]


def test_a_saved_adapter_reloads_as_the_student_with_peft_alone(write_recipe, tmp_path):
    """adapter_config.json names the converted final model as its base, so peft's own loader
    rebuilds the student (it used to name the softmax source and give the teacher's class)."""
    from peft import AutoPeftModelForCausalLM

    final = run(write_recipe(save_adapter=True))
    base = json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == final.resolve()
    ids = torch.randint(3, 100, (1, 24))
    with torch.no_grad():
        ours = linearize.load(final, adapter=final / "adapter")(ids).logits
        theirs = AutoPeftModelForCausalLM.from_pretrained(final / "adapter")
        assert type(theirs.get_base_model()).__name__.startswith("Linearized")
        assert torch.allclose(theirs(ids).logits, ours, atol=1e-6)


def spy_on_batches(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """(stage, input_ids) of every micro-batch the run trains on."""
    import linearize.distill.train as train

    seen, transfer, recovery = [], train.transfer_loss, train.recovery_loss
    monkeypatch.setattr(train, "transfer_loss",
                        lambda model, batch, *a: seen.append((1, batch["input_ids"].cpu())) or transfer(model, batch, *a))
    monkeypatch.setattr(train, "recovery_loss",
                        lambda model, peft, batch, *a: seen.append((2, batch["input_ids"].cpu()))
                        or recovery(model, peft, batch, *a))
    return seen


def test_stage1_rows_have_their_own_length_and_stage2_reads_on_from_where_they_stop(write_recipe, assets, tmp_path,
                                                                                  monkeypatch, capsys):
    from linearize.distill.data import build_rows

    seen = spy_on_batches(monkeypatch)
    final = run(write_recipe(stage1={"max_steps": None, "max_tokens": 48, "seq_len": 16}, stage2={"max_steps": 2}))
    log = read_log(final.parent)
    assert [(r["stage"], r["step"], r["tokens"]) for r in log] == [(1, 1, 16), (1, 2, 32), (1, 3, 48),
                                                                   (2, 1, 32), (2, 2, 64)]
    assert [(s, tuple(ids.shape)) for s, ids in seen] == [(1, (1, 16))] * 3 + [(2, (1, 32))] * 2
    recipe = load_recipe(final.parent / "recipe.yaml")
    tok = AutoTokenizer.from_pretrained(assets / "model")
    short = build_rows(recipe.data, tok, 16, 1, 3, recipe.seed)
    long = build_rows(recipe.data, tok, 32, 1, 4, recipe.seed)
    assert all(torch.equal(ids, short.batch([i])["input_ids"]) for i, (_, ids) in enumerate(seen[:3]))
    # stage 1 read 48 tokens = 1.5 rows of 32: stage 2 starts at the next whole row
    assert torch.equal(seen[3][1], long.batch([2])["input_ids"]) and torch.equal(seen[4][1], long.batch([3])["input_ids"])
    printed = capsys.readouterr().out
    assert "stage 1: 3 steps of 16 tokens (48 tokens), stage 2: 2 steps of 32 tokens (64 tokens)" in printed
    assert "rows of 16 tokens" in printed and "rows of 32 tokens" in printed
    assert "stage 1 48 tokens at 16-token rows" in (final / "README.md").read_text()


def test_stage1_seq_len_equal_to_seq_len_trains_exactly_as_without_it(write_recipe, tmp_path):
    a = run(write_recipe("a.yaml", output_dir=str(tmp_path / "a")))
    b = run(write_recipe("b.yaml", output_dir=str(tmp_path / "b"), stage1={"max_steps": 2, "seq_len": 32,
                                                                          "optimizer": {"lr": 1e-2}}))
    assert [r["loss"] for r in read_log(a.parent)] == [r["loss"] for r in read_log(b.parent)]
    assert load_file(str(a / "model.safetensors")).keys() == load_file(str(b / "model.safetensors")).keys()
    assert all(torch.equal(v, load_file(str(b / "model.safetensors"))[k])
               for k, v in load_file(str(a / "model.safetensors")).items())
