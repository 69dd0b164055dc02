"""Bad input during distillation never passes silently (#19 items 4, 5, 8, 10, 13): the
divergence guard, the last good checkpoint, resuming with new optimizer settings, corrupt
checkpoints, unwritable or full output, and the teacher of a distilled `final`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linearize
from linearize.distill import DistillError, RecipeError, distill, load_recipe
from linearize.distill.cli_commands import run_distill


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run(path: Path, *overrides: str) -> Path:
    return distill(load_recipe(path, list(overrides)))


def cli(path: Path, *overrides: str) -> int:
    return run_distill(argparse.Namespace(recipe=str(path), overrides=list(overrides), print_recipe=False))


def latest(tmp_path: Path) -> str:
    return (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()


def blow_up_at(monkeypatch, call: int, factor: float = 1e6):
    """Stage 1's loss multiplied by `factor` (finite) from the `call`-th forward on."""
    import linearize.distill.train as train

    real, calls = train.transfer_loss, []

    def diverging(*args):
        calls.append(1)
        loss, per_layer = real(*args)
        return (loss * factor if len(calls) >= call else loss), per_layer

    monkeypatch.setattr(train, "transfer_loss", diverging)
    return real


# -- item 4: divergence that stays finite -----------------------------------------------------
def test_a_finite_divergence_stops_the_run_without_exporting_final(write_recipe, tmp_path, monkeypatch):
    blow_up_at(monkeypatch, 8)
    path = write_recipe(stage1={"max_steps": 10, "optimizer": {"lr": 1e-3}}, stage2={"enabled": False},
                        checkpoint_every=2, keep_checkpoints=10)
    with pytest.raises(DistillError, match=r"stage 1 step 8: the loss .* is above guard.loss_ratio 10 x its running "
                                           r"median .*Stopped before updating the weights; the last good checkpoint "
                                           r"is .*stage1-step0000006.*final was not exported"):
        run(path)
    assert not (tmp_path / "run" / "final").exists()
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4, 5, 6, 7]


def test_a_real_blow_up_from_a_huge_lr_is_caught_at_its_first_step(write_recipe, tmp_path):
    path = write_recipe(stage1={"max_steps": 6, "optimizer": {"lr": 1e6, "max_grad_norm": None}})
    with pytest.raises(DistillError, match=r"stage 1 step 2: the loss .* is above guard.loss_ratio 10 x .*no healthy "
                                           r"checkpoint was written before it"):
        run(path)
    assert not (tmp_path / "run" / "final").exists()


def test_the_guard_is_configurable_and_bounds_the_gradient_norm(write_recipe, tmp_path, monkeypatch):
    blow_up_at(monkeypatch, 3, factor=50.0)
    off = write_recipe("off.yaml", stage1={"max_steps": 4}, stage2={"enabled": False}, guard={"loss_ratio": None})
    assert run(off).is_dir()  # the guard off: a 50x loss passes, as before
    norm = write_recipe("norm.yaml", output_dir=str(tmp_path / "norm"), stage2={"enabled": False},
                        stage1={"max_steps": 4, "optimizer": {"max_grad_norm": None}},
                        guard={"loss_ratio": None, "max_grad_norm": 1e-9})
    with pytest.raises(DistillError, match=r"stage 1 step 1: the gradient norm .* is above guard.max_grad_norm 1e-09"):
        run(norm)
    with pytest.raises(RecipeError, match="guard.loss_ratio must be a finite number > 1"):
        load_recipe(off, ["guard.loss_ratio=0.5"])


# -- item 5: last good = finite weights and a healthy loss; resume with a lower lr -----------
def test_last_good_skips_the_diverged_and_nonfinite_checkpoints_and_resume_takes_a_lower_lr(
        write_recipe, tmp_path, monkeypatch):
    import linearize.distill.train as train

    real_collect = train.collect_params

    def nan_at_step3(acc, model):
        params = real_collect(acc, model)
        if len(read_log(tmp_path / "run")) == 3:
            params = {k: v * float("nan") for k, v in params.items()}
        return params

    monkeypatch.setattr(train, "collect_params", nan_at_step3)
    real = blow_up_at(monkeypatch, 6)
    path = write_recipe(stage1={"max_steps": 6, "optimizer": {"lr": 1e-3, "scheduler": "constant"}},
                        stage2={"enabled": False}, checkpoint_every=1, keep_checkpoints=10)
    # step 6 diverges: checkpoint 5 holds the weights that gave it, checkpoint 3 is non-finite
    with pytest.raises(DistillError, match=r"step 6: .*the last good checkpoint is .*stage1-step0000004"):
        run(path)
    assert latest(tmp_path) == "stage1-step0000004"
    monkeypatch.setattr(train, "transfer_loss", real)
    monkeypatch.setattr(train, "collect_params", real_collect)
    run(path, "resume=true", "stage1.optimizer.lr=1e-4", "stage1.optimizer.max_grad_norm=0.5", "stage1.max_steps=7")
    log = read_log(tmp_path / "run")
    resumed = [r for r in log if "resume_changes" in r]
    assert resumed == [{"stage": 1, "step": 4, "resume_changes": {
        "stage1.max_steps": [6, 7], "stage1.optimizer.lr": [1e-3, 1e-4], "stage1.optimizer.max_grad_norm": [1.0, 0.5]}}]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["lr"] for r in steps[4:]] == pytest.approx([1e-4] * 3)


def test_resume_refuses_changes_to_the_model_or_the_data_order(write_recipe, tmp_path):
    path = write_recipe(linearize={"method": "liger-gla", "window": 8}, stage2={"max_steps": 1})
    run(path)
    for change, key in (("stage2.lora.r=4", "stage2.lora.r"), ("data.shuffle=false", "data.shuffle"),
                        ("seed=3", "seed"), ("linearize.window=4", "linearize")):
        with pytest.raises(DistillError, match=rf"recipe changed since this run started \({key}.*alter the model"):
            run(path, "resume=true", change)


# -- item 8: a corrupt latest checkpoint -------------------------------------------------------
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(write_recipe, tmp_path, capsys):
    path = write_recipe(stage1={"max_steps": 4}, stage2={"enabled": False}, checkpoint_every=2)
    run(path)
    ck = tmp_path / "run" / "checkpoints"
    params = ck / "stage1-step0000004" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    capsys.readouterr()
    run(path, "resume=true", "stage1.max_steps=5")
    out = capsys.readouterr().out
    assert f"warning: checkpoint stage1-step0000004 is unusable: {params} cannot be read" in out
    assert "resuming from stage1-step0000002" in out
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4, 5]


def test_junk_trainer_files_name_the_file_when_no_checkpoint_is_usable(write_recipe, tmp_path, capsys):
    path = write_recipe(stage1={"max_steps": 4}, stage2={"enabled": False}, checkpoint_every=2)
    run(path)
    ck = tmp_path / "run" / "checkpoints"
    for name in ("stage1-step0000002", "stage1-step0000004"):
        (ck / name / "trainer.pt").write_text("junk")
    assert cli(path, "resume=true") == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and str(ck / "stage1-step0000004" / "trainer.pt") in err
    assert str(ck / "stage1-step0000002" / "trainer.pt") in err and "Traceback" not in err


# -- item 10: unwritable or full output ----------------------------------------------------------
def test_an_unwritable_output_is_refused_before_the_model_loads(write_recipe, tmp_path, monkeypatch, capsys):
    import linearize.distill.train as train

    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the model loaded before the check"))
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        target = tmp_path / "ro" / "run"
    else:
        target = Path("/sys/linearize-distill-test/run")
    try:
        assert cli(write_recipe(output_dir=str(target))) == 2
    finally:
        if (tmp_path / "ro").exists():
            os.chmod(tmp_path / "ro", 0o755)
    err = capsys.readouterr().err
    assert "is not writable" in err and "output_dir" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
    assert cli(write_recipe()) == 2
    assert "not enough free space for output_dir" in capsys.readouterr().err


def test_a_full_disk_while_saving_is_a_clear_error(write_recipe, tmp_path, monkeypatch, capsys):
    import linearize.distill.checkpointing as checkpointing

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    path = write_recipe(stage1={"max_steps": 4}, stage2={"enabled": False}, checkpoint_every=2)
    monkeypatch.setattr(checkpointing, "save_file", full)
    assert cli(path) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint stage1-step0000002" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run" / "checkpoints").iterdir())


# -- item 13: the teacher of a distilled final stays the teacher --------------------------------
def test_a_merged_final_keeps_what_recovers_the_original_weights(write_recipe, assets, tmp_path):
    from linearize.eval.runner import unmerge_lora

    final = run(write_recipe(linearize={"method": "liger-gla", "window": 8}, stage2={"max_steps": 2}))
    config = json.loads((final / "config.json").read_text())
    assert config["linearize_base_model"] == str((assets / "model").resolve())
    assert config["linearize_merged_lora"] == "lora-delta"
    merged = load_file(str(final / "model.safetensors"))
    model = linearize.load(final, adapter=final / "lora-delta")
    assert unmerge_lora(model) == 6
    original = load_file(str(assets / "model" / "model.safetensors"))
    weights = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in original.items():
        if any(t in k for t in ("q_proj", "k_proj", "v_proj")):
            assert (merged[k] - v).abs().max() > 1e-5, f"{k}: the LoRA changed nothing, the test proves nothing"
        # merging rounds once: taking the delta back out gives the original to that rounding
        assert (weights[k] - v).abs().max() <= 8 * torch.finfo(torch.float32).eps * v.abs().max(), k

    from linearize.eval.cli_commands import add_eval_arguments, run_eval

    def ppl(folder, *flags):
        out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}"
        argv = [str(folder), "--tasks", "none", "--metrics", "ppl", "--ppl-texts", "2", "--max-length", "64",
                "--stride", "32", "--device", "cpu", "--out", str(out), *flags]
        assert run_eval(add_eval_arguments(argparse.ArgumentParser()).parse_args(argv)) == 0
        return json.loads((out / "results.json").read_text())

    base = ppl(assets / "model")["metrics"]["perplexity"]["student"]["perplexity"]
    res = ppl(final, "--teacher")
    teacher = res["metrics"]["perplexity"]["teacher"]["perplexity"]
    assert teacher == pytest.approx(base, rel=1e-5), "the teacher is not the original model"
    student = res["metrics"]["perplexity"]["student"]["perplexity"]
    merged_student = ppl(final)["metrics"]["perplexity"]["student"]["perplexity"]
    assert student == pytest.approx(merged_student, rel=1e-5)

    shutil.rmtree(final / "lora-delta")
    res = ppl(final, "--teacher")
    assert "teacher" not in res["metrics"]["perplexity"] and "recovery" not in res["metrics"]["perplexity"]
    assert any("No teacher" in n and "lora-delta is missing" in n for n in res["notes"])
