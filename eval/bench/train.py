"""Training benchmark: one stage-2-style step (peft LoRA on q, k, v) vs sequence length.

A step is forward + next-token cross-entropy + backward + AdamW update of the LoRA
parameters, on ids [batch_size, T]. The student is the linearized model with LoRA; the
teacher is plain LoRA on the original softmax attention: the same model and the same
adapters inside `linearize.teacher(model)` (the teacher's attention follows the mixers'
LoRA-wrapped projections). The adapters are removed again afterwards (`unload`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from linearize import mixers, teacher
from linearize.peft_quiet import peft_quietly
from linearize.plots import plot_roles

from .machine import machine_info
from .memory import PeakMemory
from .models import (ROLES, model_device, model_info, ordered_roles, progress, random_ids, require_linearized,
                     role_pairs)
from .report import fmt, markdown_table, mib, target, write_report
from .timing import median, spread, timed

DEFAULT_LENGTHS = (512, 2048)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")
TARGET_LENGTH, TARGET_RATIO = 512, 0.8


def bench_train(model: torch.nn.Module, lengths=DEFAULT_LENGTHS, repeats: int = 3, batch_size: int = 1,
                lora_r: int = 8, lora_alpha: int = 16, target_modules=DEFAULT_TARGETS, lr: float = 1e-4,
                show_progress: bool = True) -> list[dict]:
    """Step time, tokens/s and peak memory of LoRA training per (length, role).

    Returns one row per (length, role): role, length, batch_size, ms (median step), ms_min,
    ms_max, tokens_per_s, peak_mib (median, above the memory held before the step),
    trainable_parameters, loss (last step), seconds (every repeat). The model is left as it
    came: adapters unloaded, requires_grad flags and train/eval mode restored.
    """
    from peft import LoraConfig

    require_linearized(model)
    lengths = sorted(int(x) for x in lengths)
    device = model_device(model)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with lora_adapters(model, config) as peft_model:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr)
        peft_model.train()

        def step(ids: torch.Tensor, role: str) -> float:
            with teacher(model, role == "teacher"):
                loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        warm = random_ids(model, batch_size, min(lengths))
        for role in ROLES:
            step(warm, role)
        rows = []
        bar = progress(len(lengths) * repeats * len(ROLES), "train", show_progress)
        for length in lengths:
            ids = random_ids(model, batch_size, length, seed=length)
            seconds = {r: [] for r in ROLES}
            peaks = {r: [] for r in ROLES}
            losses = {}
            for rep in range(repeats):
                for role in ordered_roles(rep):
                    bar.set_postfix_str(f"T={length} {role}")
                    with PeakMemory(device) as pm:
                        s, losses[role] = timed(lambda: step(ids, role), device)
                    seconds[role].append(s)
                    peaks[role].append(pm.peak_bytes)
                    bar.update(1)
            for role in ROLES:
                t = spread(seconds[role])
                rows.append({
                    "role": role, "length": length, "batch_size": batch_size,
                    "ms": 1e3 * t["median"], "ms_min": 1e3 * t["min"], "ms_max": 1e3 * t["max"],
                    "tokens_per_s": batch_size * length / t["median"], "peak_mib": mib(median(peaks[role])),
                    "trainable_parameters": sum(p.numel() for p in trainable), "loss": losses[role],
                    "seconds": seconds[role],
                })
        bar.close()
    return rows


@contextlib.contextmanager
def lora_adapters(model: torch.nn.Module, config):
    """`model` wrapped in peft LoRA adapters inside the block; afterwards the adapters are
    unloaded, the teacher projections synced, requires_grad flags and train/eval mode restored."""
    from peft import get_peft_model

    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with peft_quietly():
        peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()
        for mixer in mixers(model):
            mixer.sync_teacher_projections()
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.train(was_training)


def train_summary(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-length ratios, targets): ratio = student tokens/s / teacher tokens/s."""
    ratios = [{"length": n, "throughput_ratio": p["student"]["tokens_per_s"] / p["teacher"]["tokens_per_s"]}
              for n, p in role_pairs(rows, "length").items()]
    at = {r["length"]: r["throughput_ratio"] for r in ratios}
    return ratios, [target(f"train: student tokens/s >= {TARGET_RATIO:g}x the teacher's", at.get(TARGET_LENGTH),
                           TARGET_RATIO, f"T={TARGET_LENGTH}")]


def train_table(rows: list[dict]) -> str:
    ratios = {r["length"]: r["throughput_ratio"] for r in train_summary(rows)[0]}
    body = []
    for n, p in role_pairs(rows, "length").items():
        t, s = p["teacher"], p["student"]
        body.append([str(n), fmt(t["ms"]), fmt(s["ms"]), fmt(t["tokens_per_s"], 0), fmt(s["tokens_per_s"], 0),
                     f"{ratios[n]:.2f}x", fmt(t["peak_mib"]), fmt(s["peak_mib"])])
    return markdown_table(["Length", "Teacher ms/step", "Student ms/step", "Teacher tok/s", "Student tok/s",
                           "Student/teacher", "Teacher peak MiB", "Student peak MiB"], body)


def plot_train(rows: list[dict], path: str | Path) -> Path:
    """Training tokens/s and peak memory vs sequence length, teacher beside student."""
    return plot_roles(rows, path, "length", "sequence length (tokens)", [
        (lambda r: r["tokens_per_s"], "training tokens/s (median step)", "LoRA training throughput", "zero"),
        (lambda r: r["peak_mib"], "peak memory above weights (MiB)", "LoRA training peak memory", "zero")],
        label="{role} + LoRA")



def run_train(model: torch.nn.Module, out_dir: str | Path, lengths=DEFAULT_LENGTHS, repeats: int = 3,
              batch_size: int = 1, lora_r: int = 8, lora_alpha: int = 16, target_modules=DEFAULT_TARGETS,
              show_progress: bool = True) -> dict:
    """Benchmark, then write train.{json,md,png} into out_dir; returns the report dict."""
    rows = bench_train(model, lengths, repeats, batch_size, lora_r, lora_alpha, target_modules,
                       show_progress=show_progress)
    ratios, targets = train_summary(rows)
    out = Path(out_dir)
    plot_train(rows, out / "train.png")
    report = {
        "benchmark": "train", "machine": machine_info(model_device(model)), "model": model_info(model),
        "settings": {"lengths": sorted(int(x) for x in lengths), "repeats": repeats, "batch_size": batch_size,
                     "lora_r": lora_r, "lora_alpha": lora_alpha, "target_modules": list(target_modules),
                     "step": "forward + cross-entropy + backward + AdamW on the LoRA parameters"},
        "rows": rows, "ratios": ratios, "targets": targets,
        "notes": ["Median step of the repeats; teacher = plain LoRA on the original softmax attention "
                  "(same weights, same adapters)."],
    }
    return write_report(out, "train", report, train_table(rows), "Training: stage-2 LoRA step, teacher vs student")
