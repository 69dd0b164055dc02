"""Prefill benchmark: one forward over a whole prompt, teacher beside student.

Time and peak memory of `model(ids, use_cache=False, logits_to_keep=1)` under
`torch.no_grad()`, for ids [batch_size, T] at each length T. The teacher is the same model
inside `linearize.teacher(model)`: same weights, same process, alternating with the student.
Only the last position's logits are computed (as in generation), so the [T, vocab] logits
tensor does not dominate the memory of either side.
"""
from __future__ import annotations

from pathlib import Path

import torch

from linearize import teacher
from linearize.plots import plot_roles

from .machine import machine_info
from .memory import PeakMemory
from .models import (ROLES, model_device, model_info, ordered_roles, progress, random_ids, require_linearized,
                     role_pairs)
from .report import fmt, markdown_table, mib, target, write_report
from .timing import median, spread, timed

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
TARGET_LENGTH, TARGET_SPEEDUP = 16384, 3.0


def prefill_forward(model: torch.nn.Module, ids: torch.Tensor, role: str) -> torch.Tensor:
    """Logits of the last position [B, 1, V] for ids [B, T], as teacher or student."""
    with torch.no_grad(), teacher(model, role == "teacher"):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def bench_prefill(model: torch.nn.Module, lengths=DEFAULT_LENGTHS, repeats: int = 3, batch_size: int = 1,
                  show_progress: bool = True) -> list[dict]:
    """Time and peak memory of one prefill forward per (length, role).

    Returns one row per (length, role): role, length, batch_size, ms (median over repeats),
    ms_min, ms_max, tokens_per_s, peak_mib (median peak above the memory held before the
    forward), memory_method, seconds (every repeat).
    """
    require_linearized(model)
    lengths = sorted(int(x) for x in lengths)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        warm = random_ids(model, batch_size, min(lengths))
        for role in ROLES:
            prefill_forward(model, warm, role)
        rows = []
        bar = progress(len(lengths) * repeats * len(ROLES), "prefill", show_progress)
        for length in lengths:
            ids = random_ids(model, batch_size, length, seed=length)
            seconds = {r: [] for r in ROLES}
            peaks = {r: [] for r in ROLES}
            method = ""
            for rep in range(repeats):
                for role in ordered_roles(rep):
                    bar.set_postfix_str(f"T={length} {role}")
                    with PeakMemory(device) as pm:
                        s, _ = timed(lambda: prefill_forward(model, ids, role), device)
                    seconds[role].append(s)
                    peaks[role].append(pm.peak_bytes)
                    method = pm.method
                    bar.update(1)
            for role in ROLES:
                t = spread(seconds[role])
                rows.append({
                    "role": role, "length": length, "batch_size": batch_size,
                    "ms": 1e3 * t["median"], "ms_min": 1e3 * t["min"], "ms_max": 1e3 * t["max"],
                    "tokens_per_s": batch_size * length / t["median"],
                    "peak_mib": mib(median(peaks[role])), "memory_method": method,
                    "seconds": seconds[role],
                })
        bar.close()
    finally:
        model.train(was_training)
    return rows


def prefill_summary(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-length ratios, targets): speedup = teacher ms / student ms, memory_ratio likewise."""
    ratios = []
    for length, pair in role_pairs(rows, "length").items():
        t, s = pair["teacher"], pair["student"]
        ratios.append({"length": length, "speedup": t["ms"] / s["ms"],
                       "memory_ratio": t["peak_mib"] / s["peak_mib"] if s["peak_mib"] else None})
    at = {r["length"]: r for r in ratios}
    value = at[TARGET_LENGTH]["speedup"] if TARGET_LENGTH in at else None
    return ratios, [target(f"prefill: student >= {TARGET_SPEEDUP:g}x faster than the teacher", value, TARGET_SPEEDUP,
                           f"T={TARGET_LENGTH}")]


def prefill_table(rows: list[dict]) -> str:
    ratios = {r["length"]: r for r in prefill_summary(rows)[0]}
    body = []
    for length, pair in role_pairs(rows, "length").items():
        t, s, q = pair["teacher"], pair["student"], ratios[length]
        body.append([str(length), fmt(t["ms"]), fmt(s["ms"]), f"{q['speedup']:.2f}x",
                     fmt(t["tokens_per_s"], 0), fmt(s["tokens_per_s"], 0), fmt(t["peak_mib"]), fmt(s["peak_mib"]),
                     "—" if q["memory_ratio"] is None else f"{q['memory_ratio']:.2f}x"])
    return markdown_table(["Length", "Teacher ms", "Student ms", "Speedup", "Teacher tok/s", "Student tok/s",
                           "Teacher peak MiB", "Student peak MiB", "Memory ratio"], body)


def plot_prefill(rows: list[dict], path: str | Path) -> Path:
    """Prefill time and peak memory vs sequence length, teacher beside student."""
    return plot_roles(rows, path, "length", "sequence length (tokens)", [
        (lambda r: r["ms"] / 1e3, "forward time (s, median)", "prefill time", "log"),
        (lambda r: r["peak_mib"], "peak memory above weights (MiB)", "prefill peak memory", None)])



def run_prefill(model: torch.nn.Module, out_dir: str | Path, lengths=DEFAULT_LENGTHS, repeats: int = 3,
                batch_size: int = 1, show_progress: bool = True) -> dict:
    """Benchmark, then write prefill.{json,md,png} into out_dir; returns the report dict."""
    rows = bench_prefill(model, lengths, repeats, batch_size, show_progress)
    ratios, targets = prefill_summary(rows)
    out = Path(out_dir)
    plot_prefill(rows, out / "prefill.png")
    report = {
        "benchmark": "prefill", "machine": machine_info(model_device(model)), "model": model_info(model),
        "settings": {"lengths": sorted(int(x) for x in lengths), "repeats": repeats, "batch_size": batch_size,
                     "logits_to_keep": 1, "grad": False, "use_cache": False},
        "rows": rows, "ratios": ratios, "targets": targets,
        "notes": ["Median of the repeats; peak memory is above what the process held before the forward "
                  f"({rows[0]['memory_method']})."],
    }
    return write_report(out, "prefill", report, prefill_table(rows), "Prefill: one forward, teacher vs student")
