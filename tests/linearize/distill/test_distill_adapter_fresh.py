"""The README's adapter command in a process that never imported linearize (#13, item 2):
`AutoPeftModelForCausalLM.from_pretrained(final/adapter, trust_remote_code=True)` builds the
distilled student (its base is the converted `final`, whose auto_map brings in linearize's
classes) and gives the logits `linearize.load(final, adapter=...)` gives; without the flag,
transformers says to pass it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import linearize
from linearize.distill import distill, load_recipe

FRESH = """
import sys, torch
from peft import AutoPeftModelForCausalLM
assert "linearize" not in sys.modules
adapter, ref = sys.argv[1], sys.argv[2]
model = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True)
assert "linearize" in sys.modules  # brought in by the folder's auto_map module, not by this script
ids, logits = torch.load(ref)
with torch.no_grad():
    err = (model(ids).logits - logits).abs().max().item()
print(type(model.get_base_model()).__name__, err)
"""


def fresh_python(code: str, *args, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp / "modules"))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_auto_peft_in_a_fresh_process_gives_the_student(write_recipe, tmp_path):
    final = distill(load_recipe(write_recipe(save_adapter=True, stage1={"max_steps": 1}, stage2={"max_steps": 2})))
    student = linearize.load(final, adapter=final / "adapter")
    ids = torch.randint(3, 100, (1, 24))
    with torch.no_grad():
        torch.save((ids, student(ids).logits), tmp_path / "ref.pt")
        with linearize.teacher(student):
            teacher_gap = (student(ids).logits - torch.load(tmp_path / "ref.pt")[1]).abs().max().item()
    assert teacher_gap > 1e-3  # the comparison below can tell the student from the original
    res = fresh_python(FRESH, final / "adapter", tmp_path / "ref.pt", tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    name, err = res.stdout.split()[-2:]
    assert name.startswith("Linearized") and float(err) < 1e-5, res.stdout
    without_flag = fresh_python(FRESH.replace(", trust_remote_code=True", ""), final / "adapter", tmp_path / "ref.pt",
                                tmp=tmp_path)
    assert without_flag.returncode != 0 and "trust_remote_code=True" in without_flag.stderr, without_flag.stderr[-3000:]

