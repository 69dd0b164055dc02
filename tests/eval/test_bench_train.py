"""Training benchmark at toy sizes: LoRA steps for teacher and student, model left as it came."""
import importlib.util
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import linearize
from linearize.eval.bench.train import TARGET_LENGTH, run_train, train_summary, train_table


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """The chunked torch kernels where they exist, else the reference ones (small shapes only)."""
    if importlib.util.find_spec("linearize.kernels.window.torch_chunk") is None:
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "naive")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_writes_table_json_and_plot_and_restores_the_model(make_tiny_model, tmp_path):
    model = linearize.convert(make_tiny_model("llama"), method="lizard", window=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = run_train(model, tmp_path, lengths=[16, 32], repeats=1, show_progress=False)

    rows = report["rows"]
    assert [(r["length"], r["role"]) for r in rows] == [(16, "teacher"), (16, "student"), (32, "teacher"),
                                                        (32, "student")]
    for r in rows:
        assert positive(r["ms"]) and positive(r["tokens_per_s"]) and positive(r["loss"])
        assert r["trainable_parameters"] == 2 * (8 * (64 + 64) + 2 * 8 * (64 + 32))  # per layer q 64->64, k, v 64->32
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0
    assert all(positive(q["throughput_ratio"]) for q in report["ratios"])
    assert report["targets"][0]["met"] is None

    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["settings"]["lora_r"] == 8 and saved["settings"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert "cpu_count" in saved["machine"] and "peft" in saved["machine"]
    assert "| 16 |" in (tmp_path / "train.md").read_text()
    assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"

    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for m in linearize.mixers(model):
        assert type(m.q_proj) is torch.nn.Linear and m._teacher_attention.q_proj is m.q_proj


def test_teacher_role_trains_the_same_adapters(make_tiny_model):
    model = linearize.convert(make_tiny_model("llama"), method="liger-gla", window=8)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    ids = torch.randint(0, 128, (1, 12))
    for role in ("teacher", "student"):
        with linearize.teacher(model, role == "teacher"):
            peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads), role
        peft_model.zero_grad(set_to_none=True)
    assert all(m._teacher_attention.q_proj is m.q_proj for m in linearize.mixers(model))


def test_train_target_is_judged_at_512():
    rows = [dict(role=role, length=TARGET_LENGTH, ms=ms, tokens_per_s=TARGET_LENGTH / ms * 1e3, peak_mib=1.0)
            for role, ms in (("teacher", 100.0), ("student", 125.0))]
    ratios, targets = train_summary(rows)
    assert ratios[0]["throughput_ratio"] == pytest.approx(0.8) and targets[0]["met"] is True
    assert "0.80x" in train_table(rows)
