"""Decode benchmark: milliseconds per generated token and cache memory vs context length.

For each context length C: prefill ids [B, C] once, in pieces of `prefill_chunk` tokens
(the teacher into a transformers `DynamicCache`, the student into a `LinearizeCache`), then
time single-token steps `model(ids [B, 1], cache=...)`. Teacher and student steps
alternate, so load on the machine hits both alike; the quoted figure is the median step.
Cache bytes are measured right after the prefill, i.e. at exactly C tokens of context.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transformers import DynamicCache

from linearize import LinearizeCache, teacher
from linearize.generate import cache_nbytes
from linearize.plots import plot_roles

from .machine import machine_info
from .models import ROLES, model_device, model_info, progress, random_ids, require_linearized, role_pairs
from .report import fmt, human_bytes, markdown_table, mib, target, write_report
from .timing import spread, timed

DEFAULT_CONTEXTS = (1024, 4096, 16384)
TARGET_CONTEXT, TARGET_SPEEDUP, TARGET_CACHE_RATIO = 16384, 3.0, 100.0


def new_cache(model: torch.nn.Module, role: str):
    """An empty decode cache: `DynamicCache` for the teacher, `LinearizeCache` for the student."""
    return DynamicCache(config=model.config) if role == "teacher" else LinearizeCache(model)


def prefill_cache(model: torch.nn.Module, ids: torch.Tensor, role: str, chunk: int = 2048):
    """Fill a new cache with ids [B, C], `chunk` tokens per forward. Returns the cache."""
    cache = new_cache(model, role)
    with torch.no_grad(), teacher(model, role == "teacher"):
        for a in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def decode_step(model: torch.nn.Module, token: torch.Tensor, cache, role: str) -> torch.Tensor:
    """One generation step: token [B, 1] -> next-token logits [B, 1, V]; the cache grows by one."""
    with torch.no_grad(), teacher(model, role == "teacher"):
        return model(input_ids=token, cache=cache, use_cache=True).logits


def bench_decode(model: torch.nn.Module, contexts=DEFAULT_CONTEXTS, steps: int = 32, warmup: int = 2,
                 batch_size: int = 1, prefill_chunk: int = 2048, show_progress: bool = True) -> list[dict]:
    """Per-token decode time and cache bytes per (context, role).

    Returns one row per (context, role): role, context, batch_size, ms_per_token (median of
    `steps` timed steps after `warmup` untimed ones), ms_min, ms_max, tokens_per_s,
    cache_bytes and cache_mib (at C tokens), prefill_s (the piecewise prefill), step_ms.
    """
    require_linearized(model)
    contexts = sorted(int(c) for c in contexts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    rows = []
    bar = progress(len(contexts) * (2 * len(ROLES) + steps + warmup), "decode", show_progress)
    try:
        for context in contexts:
            ids = random_ids(model, batch_size, context, seed=context)
            tokens = random_ids(model, batch_size, steps + warmup, seed=context + 1)
            caches, prefill_s, nbytes, step_s = {}, {}, {}, {r: [] for r in ROLES}
            for role in ROLES:
                bar.set_postfix_str(f"C={context} {role} prefill")
                prefill_s[role], caches[role] = timed(lambda: prefill_cache(model, ids, role, prefill_chunk), device)
                nbytes[role] = cache_nbytes(caches[role])
                bar.update(len(ROLES))
            bar.set_postfix_str(f"C={context} steps")
            for i in range(steps + warmup):
                for role in ROLES:
                    s, _ = timed(lambda: decode_step(model, tokens[:, i:i + 1], caches[role], role), device)
                    if i >= warmup:
                        step_s[role].append(s)
                bar.update(1)
            for role in ROLES:
                t = spread(step_s[role])
                rows.append({
                    "role": role, "context": context, "batch_size": batch_size,
                    "ms_per_token": 1e3 * t["median"], "ms_min": 1e3 * t["min"], "ms_max": 1e3 * t["max"],
                    "tokens_per_s": batch_size / t["median"],
                    "cache_bytes": nbytes[role], "cache_mib": mib(nbytes[role]), "prefill_s": prefill_s[role],
                    "step_ms": [1e3 * s for s in step_s[role]],
                })
            del caches
        bar.close()
    finally:
        model.train(was_training)
    return rows


def decode_summary(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-context ratios, targets): speedup = teacher ms / student ms per token,
    cache_ratio = teacher cache bytes / student cache bytes."""
    ratios = [{"context": c, "speedup": p["teacher"]["ms_per_token"] / p["student"]["ms_per_token"],
               "cache_ratio": p["teacher"]["cache_bytes"] / max(p["student"]["cache_bytes"], 1)}
              for c, p in role_pairs(rows, "context").items()]
    at = {r["context"]: r for r in ratios}
    hit = at.get(TARGET_CONTEXT)
    where = f"C={TARGET_CONTEXT}"
    speedup, cache_ratio = (hit["speedup"], hit["cache_ratio"]) if hit else (None, None)
    return ratios, [
        target(f"decode: student >= {TARGET_SPEEDUP:g}x faster per token", speedup, TARGET_SPEEDUP, where),
        target(f"decode: student cache >= {TARGET_CACHE_RATIO:g}x smaller", cache_ratio, TARGET_CACHE_RATIO, where),
    ]


def decode_table(rows: list[dict]) -> str:
    ratios = {r["context"]: r for r in decode_summary(rows)[0]}
    body = []
    for c, p in role_pairs(rows, "context").items():
        t, s, q = p["teacher"], p["student"], ratios[c]
        body.append([str(c), fmt(t["ms_per_token"], 2), fmt(s["ms_per_token"], 2), f"{q['speedup']:.2f}x",
                     human_bytes(t["cache_bytes"]), human_bytes(s["cache_bytes"]), f"{q['cache_ratio']:.1f}x",
                     fmt(t["prefill_s"], 2), fmt(s["prefill_s"], 2)])
    return markdown_table(["Context", "Teacher ms/token", "Student ms/token", "Speedup", "Teacher cache",
                           "Student cache", "Cache ratio", "Teacher prefill s", "Student prefill s"], body)


def plot_decode(rows: list[dict], path: str | Path) -> Path:
    """ms per token and cache MiB vs context length, teacher beside student."""
    return plot_roles(rows, path, "context", "context length (tokens)", [
        (lambda r: r["ms_per_token"], "ms per generated token (median)", "decode step time", None),
        (lambda r: r["cache_mib"], "cache memory (MiB)", "decode cache memory", "log")])



def run_decode(model: torch.nn.Module, out_dir: str | Path, contexts=DEFAULT_CONTEXTS, steps: int = 32,
               warmup: int = 2, batch_size: int = 1, prefill_chunk: int = 2048, show_progress: bool = True) -> dict:
    """Benchmark, then write decode.{json,md,png} into out_dir; returns the report dict."""
    rows = bench_decode(model, contexts, steps, warmup, batch_size, prefill_chunk, show_progress)
    ratios, targets = decode_summary(rows)
    out = Path(out_dir)
    plot_decode(rows, out / "decode.png")
    report = {
        "benchmark": "decode", "machine": machine_info(model_device(model)), "model": model_info(model),
        "settings": {"contexts": sorted(int(c) for c in contexts), "steps": steps, "warmup": warmup,
                     "batch_size": batch_size, "prefill_chunk": prefill_chunk},
        "rows": rows, "ratios": ratios, "targets": targets,
        "notes": [f"Median of {steps} single-token steps (after {warmup} untimed), teacher and student steps "
                  "alternating; cache bytes at exactly the context length (teacher: DynamicCache keys+values, "
                  "student: LinearizeCache state, window and sinks)."],
    }
    return write_report(out, "decode", report, decode_table(rows), "Decode: per-token time and cache memory")
