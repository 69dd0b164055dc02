"""Checkpoints hold only what trains (new + LoRA parameters, their optimizer state, RNG) under
one process and under FSDP; new parameters train in fp32 under a bf16 model; modes distill
cannot checkpoint or train right are refused before anything loads."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from linearize.convert import mixers, new_parameters
from linearize.distill import distill, load_recipe
from linearize.distill.checkpointing import PARAMS_FILE, TRAINER_FILE, TRAINER_JSON
from linearize.distill.sharding import ShardingError, check_mode, keep_new_parameters_fp32
from linearize.distill.train import DistillError, build_model, kept_parameter
from linearize.mixers import AttentionTransfer

WORKER = Path(__file__).with_name("fsdp_cpu_worker.py")
# the files of a checkpoint of one or two processes: nothing that holds frozen weights
CHECKPOINT_FILES = {PARAMS_FILE, TRAINER_FILE, TRAINER_JSON, "optimizer.bin", "random_states_0.pkl",
                    "random_states_1.pkl"}


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())


def assert_only_trainable(run: Path, model_bytes: int) -> None:
    """Every checkpoint holds kept parameters only, and far fewer bytes than the frozen model."""
    for ck in checkpoint_dirs(run):
        files = {p.name for p in ck.rglob("*") if p.is_file()}
        assert files <= CHECKPOINT_FILES, (ck.name, files - CHECKPOINT_FILES)
        params = load_file(str(ck / PARAMS_FILE))
        assert params and all(kept_parameter(k) for k in params), sorted(params)
        trained = sum(v.numel() for v in params.values())
        size = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
        # fp32 parameters + two AdamW moments, plus RNG / trainer files of a few KiB each
        assert size < 3 * 4 * trained + 64 * 1024, (ck.name, size, trained)
        assert size < model_bytes / 2, (ck.name, size, model_bytes)


def test_checkpoints_hold_only_trainable_tensors_and_new_parameters_are_fp32_under_bf16(write_recipe, assets,
                                                                                           tmp_path):
    path = write_recipe(model={"path": str(assets / "model"), "dtype": "bfloat16"}, checkpoint_every=1,
                        keep_checkpoints=4, stage2={"max_steps": 2, "train_new_parameters": True})
    distill(load_recipe(path))
    run = tmp_path / "run"
    model_bytes = (assets / "model" / "model.safetensors").stat().st_size
    assert_only_trainable(run, model_bytes)
    names = [ck.name for ck in checkpoint_dirs(run)]
    assert names == ["stage1-step0000001", "stage1-step0000002", "stage2-step0000001", "stage2-step0000002"]
    stage1 = load_file(str(run / "checkpoints" / names[1] / PARAMS_FILE))
    assert all("linearize_" in k for k in stage1)
    assert {v.dtype for v in stage1.values()} == {torch.float32}  # trained in fp32, not bf16
    stage2 = load_file(str(run / "checkpoints" / names[3] / PARAMS_FILE))
    assert any("lora_" in k for k in stage2) and {v.dtype for v in stage2.values()} == {torch.float32}


@pytest.mark.parametrize("method", ["lizard", "lolcats", "gated-deltanet"])  # those with new parameters
def test_new_parameters_train_in_fp32_in_a_bf16_model_and_the_forward_still_works(write_recipe, method):
    recipe = load_recipe(write_recipe(model={"dtype": "bfloat16"}, linearize={"method": method}))
    model = build_model(recipe, recipe.model.path)
    new = dict(new_parameters(model))
    assert new and {p.dtype for p in new.values()} == {torch.bfloat16}
    ids = torch.randint(3, 100, (2, 24))
    before = model(input_ids=ids).logits
    assert keep_new_parameters_fp32(model) == len(new)
    assert {p.dtype for p in new.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in new} == {torch.bfloat16}
    after = model(input_ids=ids).logits
    assert after.dtype == torch.bfloat16 and torch.isfinite(after).all()
    # the same weights, computed in fp32 where they are new: the logits barely move
    assert (after.float() - before.float()).abs().max() < 0.1
    transfer = AttentionTransfer()
    for m in mixers(model):
        m.transfer = transfer
    model(input_ids=ids, logits_to_keep=1)
    torch.stack(transfer.losses).sum().backward()
    grads = [p.grad for p in new.values() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float32}
    assert all(torch.isfinite(g).all() for g in grads)
    assert keep_new_parameters_fp32(model) == 0  # a second call changes nothing


def test_a_checkpoint_whose_optimizer_state_is_keyed_by_position_still_resumes(write_recipe, tmp_path):
    """accelerator.save_state wrote optimizer.state_dict() (ids by position) before save_state."""
    path = write_recipe(stage1={"enabled": False}, checkpoint_every=1,
                        stage2={"max_steps": 2, "optimizer": {"lr": 1e-3, "scheduler": "constant"}})
    straight = tmp_path / "straight"
    distill(load_recipe(path, ["stage2.max_steps=3", f"output_dir={straight}"]))
    distill(load_recipe(path))
    file = tmp_path / "run" / "checkpoints" / "stage2-step0000002" / "optimizer.bin"
    named = torch.load(file, weights_only=False)
    ids = {name: i for i, name in enumerate(n for g in named["param_groups"] for n in g["params"])}
    torch.save({"state": {ids[k]: v for k, v in named["state"].items()},
                "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in named["param_groups"]]}, file)
    distill(load_recipe(path, ["resume=true", "stage2.max_steps=3"]))
    assert losses(tmp_path / "run") == losses(straight)


def fake_accelerator(mode: DistributedType, fsdp_version: int | None = None):
    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(distributed_type=mode, state=SimpleNamespace(fsdp_plugin=plugin))


@pytest.mark.parametrize("mode, version, dtype, stage1, says", [
    (DistributedType.DEEPSPEED, None, "float32", False, "writes the whole model"),
    (DistributedType.FSDP, 2, "float32", True, "stage 1 cannot run under FSDP"),
    (DistributedType.FSDP, 1, "bfloat16", False, "set model.dtype=float32"),
])
def test_modes_distill_cannot_checkpoint_or_train_right_are_refused(mode, version, dtype, stage1, says):
    with pytest.raises(ShardingError, match=says):
        check_mode(fake_accelerator(mode, version), dtype, stage1)


@pytest.mark.parametrize("mode, version, dtype", [(DistributedType.NO, None, "bfloat16"),
                                                  (DistributedType.MULTI_GPU, None, "bfloat16"),
                                                  (DistributedType.FSDP, 2, "bfloat16"),
                                                  (DistributedType.FSDP, 1, "float32")])
def test_supported_modes_pass(mode, version, dtype):
    check_mode(fake_accelerator(mode, version), dtype, stage1=mode != DistributedType.FSDP)


def test_a_refused_mode_stops_the_run_before_anything_is_written(write_recipe, tmp_path, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(DistillError, match="DEEPSPEED is not supported"):
        distill(load_recipe(write_recipe()))
    assert not (tmp_path / "run" / "recipe.yaml").exists()


# -- two processes under FSDP on CPU (gloo) -------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(version: int | None, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo): DDP for version None, else FSDP `version` (fsdp_cpu_worker)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    target = ["-m", "linearize.distill"] if version is None else [str(WORKER), str(version)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *target, str(recipe), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def losses(run: Path) -> dict[tuple[int, int], float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["stage"], r["step"]): r["loss"] for r in records if "loss" in r}


def test_stage1_under_ddp_then_stage2_under_fsdp2_on_cpu_checkpoints_trainables_only_like_one_process(
        write_recipe, assets, tmp_path):
    # a constant stage-2 schedule: raising max_steps on resume then continues the same run
    path = write_recipe(checkpoint_every=1, keep_checkpoints=8,
                        stage2={"max_steps": 2, "train_new_parameters": True,
                                "optimizer": {"lr": 1e-3, "scheduler": "constant"}})
    out = tmp_path / "two"
    for version, steps in ((None, 2), (2, 3), (2, 4)):  # DDP, then FSDP resumes DDP's and its own checkpoint
        resume = ["resume=true"] if version else []
        done = launch(version, path, f"output_dir={out}", f"stage2.max_steps={steps}", *resume)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "on 2 process(es)" in done.stdout
        assert version is None or f"resuming from stage2-step{steps - 1:07d}" in done.stdout
    assert_only_trainable(out, (assets / "model" / "model.safetensors").stat().st_size)
    single = distill(load_recipe(path, ["stage2.max_steps=4", "gradient_accumulation_steps=2",
                                        f"output_dir={tmp_path / 'single'}"]))
    a, b = losses(out), losses(tmp_path / "single")
    assert list(a) == list(b) == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-4), key
    final, ref = load_file(str(out / "final" / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], rtol=1e-4, atol=1e-5)


def test_fsdp2_on_cpu_trains_fp32_new_parameters_beside_bf16_weights(write_recipe, tmp_path):
    path = write_recipe(model={"dtype": "bfloat16"}, stage1={"enabled": False},
                        stage2={"max_steps": 1, "train_new_parameters": True})
    done = launch(2, path, f"output_dir={tmp_path / 'bf16'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    params = load_file(str(tmp_path / "bf16" / "checkpoints" / "stage2-step0000001" / PARAMS_FILE))
    assert any("linearize_" in k for k in params) and {v.dtype for v in params.values()} == {torch.float32}


def test_two_process_fsdp1_on_cpu(write_recipe, tmp_path):
    path = write_recipe(stage1={"enabled": False}, stage2={"max_steps": 1, "train_new_parameters": True})
    done = launch(1, path, f"output_dir={tmp_path / 'fsdp1'}")
    if "Inconsistent compute device and `device_id`" in done.stderr:
        pytest.skip("FSDP 1 cannot run on CPU here: torch's FullyShardedDataParallel refuses the device_id=cpu that "
                    "accelerate passes ('Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0'); "
                    "its checkpoint path is the same torch.distributed.checkpoint.state_dict calls FSDP 2 runs")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_only_trainable(tmp_path / "fsdp1", 1 << 40)
