"""The README's stock lm-eval command scores the student (#13): `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` on a converted folder, run as its own process (which
never imports linearize itself: config.json's auto_map brings in the folder's module), offline,
with a local task (`dataset_path: json` over a file) passed by --include_path. Its per-choice
log-likelihoods must be the student's, not the softmax teacher's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearize
from helpers.tiny import tiny_model

TASK = "linearize_tiny_choice"
QUESTIONS = [("w5 w6 w7", ["w8", "w9", "w40"], 0), ("w20 w21", ["w3", "w22"], 1), ("w60 w61 w62 w63", ["w64", "w2"], 0)]


def lm_eval_command() -> list[str]:
    """The `lm_eval` console script of this interpreter's environment (`python -m lm_eval` if absent)."""
    script = Path(sys.executable).parent / "lm_eval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


def word_tokenizer():
    """A 128-word tokenizer (w0 .. w127) matching the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


def write_local_task(folder: Path) -> Path:
    """A multiple-choice task over a local JSONL file, as a user writes one for --include_path."""
    folder.mkdir()
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return folder


def loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """log p(choice | context) as lm-eval's hf model scores it (no BOS, choice after a space)."""
    out = []
    for choice in choices:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = tok(f"{context} {choice}", add_special_tokens=False)["input_ids"][len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)[0]
        out.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
    return out


def test_stock_lm_eval_scores_the_student_from_a_converted_folder(tmp_path):
    model = linearize.convert(tiny_model("llama"), method="lizard", window=2)
    for _, p in linearize.new_parameters(model):  # away from the init, so student and teacher differ
        p.data.normal_(0, 0.5)
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tok = word_tokenizer()
    tok.save_pretrained(folder)
    tasks = write_local_task(tmp_path / "tasks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    cmd = [*lm_eval_command(), "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
           "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"|{TASK}" in res.stdout and "acc" in res.stdout, res.stdout[-2000:]
    samples = [json.loads(line) for f in sorted((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))
    theirs = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}  # written as strings
    with linearize.teacher(model):
        teacher = [loglikelihoods(model, tok, q, c) for q, c, _ in QUESTIONS]
    student = [loglikelihoods(model, tok, q, c) for q, c, _ in QUESTIONS]
    for i in range(len(QUESTIONS)):
        assert theirs[i] == pytest.approx(student[i], abs=1e-4)
        assert max(abs(a - b) for a, b in zip(theirs[i], teacher[i])) > 1e-2
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = sum(max(range(len(s)), key=s.__getitem__) == a for s, (_, _, a) in zip(student, QUESTIONS)) / len(QUESTIONS)
    assert results["results"][TASK]["acc,none"] == pytest.approx(acc)
