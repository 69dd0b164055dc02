"""CPU speed check of the gated delta rule: the chunked WY form against the token loop.

Times `chunk_gated_delta_rule` (chunks of `--chunk-size`; default the kernel's, 32 on the CPU)
against two token loops, forward under `torch.no_grad()`, B = 1, H query heads over HKV
key/value heads of size D: the decode step's vectorised fp32 loop `recurrent_gated_delta_rule`,
and the fp64 reference `naive_gated_delta_rule` (the loop `benchmarks/kernels_cpu.py` compares
against; timed on its first `--reference-tokens` tokens and scaled linearly). Median of
`--repeats` runs after a warm-up; the chunked form and the fp32 loop alternate within each
repeat, so load from other processes hits both alike. Not a test.

    python benchmarks/delta_cpu.py [--lengths 1024 4096] [--threads 1] [--repeats 3] [--chunk-size 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from linearize.kernels.delta.torch_chunk import chunk_gated_delta_rule
from linearize.kernels.delta.naive import naive_gated_delta_rule
from linearize.kernels.delta.torch_recurrent import recurrent_gated_delta_rule


def inputs(T: int, H: int, HKV: int, D: int):
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, T, H, D, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T, HKV, D, generator=gen), dim=-1)
    v = torch.randn(1, T, HKV, D, generator=gen)
    beta = torch.sigmoid(torch.randn(1, T, HKV, generator=gen))
    g = F.logsigmoid(torch.randn(1, T, HKV, generator=gen) + 4)
    return q, k, v, beta, g


def seconds(fns, repeats: int) -> list[float]:
    """Median seconds of each function, after a warm-up, the functions taking turns in each repeat."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-tokens", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"B=1 H={a.heads} HKV={a.kv_heads} D={a.head_dim} fp32, {a.threads} thread(s), forward")
    print(f"{'T':>7} {'chunk ms':>10} {'fp32 loop ms':>13} {'speedup':>8} {'fp64 ref ms':>12} {'speedup':>8} "
          f"{'rel err':>9}")
    for T in a.lengths:
        x = inputs(T, a.heads, a.kv_heads, a.head_dim)
        with torch.no_grad():
            oc, _ = chunk_gated_delta_rule(*x, chunk_size=a.chunk_size)
            ol, _ = recurrent_gated_delta_rule(*x)
            tc, tl = seconds([lambda: chunk_gated_delta_rule(*x, chunk_size=a.chunk_size),
                              lambda: recurrent_gated_delta_rule(*x)], a.repeats)
            n = min(T, a.reference_tokens)
            prefix = [t[:, :n].double() for t in x]
            tr = seconds([lambda: naive_gated_delta_rule(*prefix)], 1)[0] * T / n
        err = ((oc - ol).norm() / ol.norm()).item()
        print(f"{T:>7} {tc * 1e3:>10.1f} {tl * 1e3:>13.1f} {tl / tc:>7.1f}x {tr * 1e3:>12.0f} {tr / tc:>7.0f}x "
              f"{err:>9.1e}")


if __name__ == "__main__":
    main()
