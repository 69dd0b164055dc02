"""Timing: device-synchronised wall clock and the summary of repeated measurements."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str = "cpu") -> tuple[float, object]:
    """(seconds, fn()) with the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> dict:
    """median, min, max of a list of measurements."""
    return {"median": median(xs), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}
