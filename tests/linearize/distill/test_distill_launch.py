"""Real processes: SIGKILL mid-run then resume, and a 2-process DDP run under accelerate."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linearize.distill import distill, load_recipe

pytestmark = pytest.mark.slow


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[tuple[int, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in read_log(run_dir) if "loss" in r}


def eval_and_layer_records(run_dir: Path) -> dict[tuple, float]:
    """Held-out perplexity and stage-1 per-layer MSE, keyed by (stage, step[, layer])."""
    out = {}
    for r in read_log(run_dir):
        if "eval_ppl" in r:
            out[(r["stage"], r["step"], "ppl")] = r["eval_ppl"]
        for layer, mse in (r.get("layer_mse") or {}).items():
            out[(r["stage"], r["step"], layer)] = mse
    return out


def assert_same_losses(a: dict, b: dict, rel: float) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_during_stage2_then_resume_matches_an_uninterrupted_run(write_recipe, tmp_path):
    path = write_recipe(stage1={"max_steps": 4}, stage2={"max_steps": 16, "kd_ratio": 0.5}, checkpoint_every=2,
                        keep_checkpoints=2)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "linearize.distill", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if latest.is_file() and latest.read_text().strip() >= "stage2-step0000004":
                break
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
            time.sleep(0.02)
        else:
            pytest.fail("no stage-2 checkpoint appeared within 240 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest.read_text().strip()
    logged = read_log(out)
    assert logged[-1]["stage"] == 2 and logged[-1]["step"] < 16

    final = distill(load_recipe(path, ["resume=true"]))
    resumed = losses(out)
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())

    reference = distill(load_recipe(path, [f"output_dir={tmp_path / 'reference'}"]))
    assert_same_losses(resumed, losses(tmp_path / "reference"), rel=1e-5)
    a, b = load_file(str(final / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k} (killed at {killed_at}): {m}")


def test_two_process_ddp_matches_one_process_at_the_same_global_batch(write_recipe, assets, tmp_path):
    # every process evaluates the same held-out rows; the main one logs them
    path = write_recipe(stage1={"max_steps": 3}, stage2={"max_steps": 3, "kd_ratio": 0.5},
                        eval={"every_tokens": 128, "texts": 4, "source": str(assets / "docs.jsonl")})
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "linearize.distill", str(path),
           f"output_dir={tmp_path / 'ddp'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    single = distill(load_recipe(path, ["gradient_accumulation_steps=2", f"output_dir={tmp_path / 'single'}"]))
    assert_same_losses(losses(tmp_path / "ddp"), losses(tmp_path / "single"), rel=1e-4)
    evals = eval_and_layer_records(tmp_path / "ddp")
    assert [k for k in evals if k[2] == "ppl"] == [(1, 0, "ppl"), (1, 2, "ppl"), (1, 3, "ppl"), (2, 0, "ppl"),
                                                   (2, 2, "ppl"), (2, 3, "ppl")]
    assert_same_losses(evals, eval_and_layer_records(tmp_path / "single"), rel=1e-4)
    a = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    b = load_file(str(single / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
