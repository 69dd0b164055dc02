"""CPU kernel benchmark: the chunked PyTorch kernels against the loop/dense references.

For each length T: `chunk_gla` vs `naive_gla` (per-channel and per-head gates) and
`chunk_window_attention` vs `naive_window_attention` (sliding window with sink tokens), at
B = 1, H query heads over HKV key/value heads, head size D, fp32. Forward times are the
median of `repeats` runs under `torch.no_grad()` after a warm-up; the chunked kernels are
also timed forward + backward. A reference too slow (or, for the dense window reference,
too large) to run at T is timed on the first `naive_max` tokens and scaled: linearly for the
recurrent loop, quadratically for the dense T x T attention; such rows are marked estimated.
Everything runs once per torch thread count (default: 1 and every core this process may use),
since the chunked kernels are matrix products that split across cores and the loop is not.

    python benchmarks/kernels_cpu.py [--lengths 1024 4096 16384] [--threads 1 2] [--out DIR]

writes kernels_cpu.json, kernels_cpu.md and kernels_cpu.png into DIR.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from linearize.eval.bench.machine import machine_info
from linearize.eval.bench.report import fmt, markdown_table, target, target_lines, write_report
from linearize.eval.bench.timing import median, timed
from linearize.kernels.gla.torch_chunk import chunk_gla
from linearize.kernels.gla.naive import naive_gla
from linearize.kernels.window.torch_chunk import chunk_window_attention
from linearize.kernels.window.naive import naive_window_attention
from linearize.plots import log2_axis, log_y, new_figure, save_figure

DEFAULT_LENGTHS = (1024, 4096, 16384)
DEFAULT_OUT = Path("outputs/bench/kernels_cpu")
TARGET_LENGTH, TARGET_SPEEDUP = 4096, 20.0
OPS = ("gla", "gla_scalar", "window")
LABELS = {"gla": "GLA, per-channel gates", "gla_scalar": "GLA, per-head gates", "window": "sliding window + sinks"}


def _inputs(op: str, T: int, heads: int, kv_heads: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, heads, dim, generator=gen)
    k = torch.randn(1, T, kv_heads, dim, generator=gen) / dim**0.5
    v = torch.randn(1, T, kv_heads, dim, generator=gen)
    if op == "window":
        return [q, k, v]
    shape = (1, T, kv_heads) if op == "gla_scalar" else (1, T, kv_heads, dim)
    g = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen) + 3) / 4
    return [q, k, v, g]


def _call(op: str, impl: str, xs: list[torch.Tensor], window: int, sink_tokens: int):
    if op == "window":
        fn = chunk_window_attention if impl == "chunk" else naive_window_attention
        return fn(*xs, window=window, num_sink_tokens=sink_tokens)
    fn = chunk_gla if impl == "chunk" else naive_gla
    return fn(*xs, scale=xs[0].shape[-1] ** -0.5)


def default_threads() -> list[int]:
    """1 and the number of cores this process may run on (one entry on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, cores})


def _time(fn, repeats: int) -> list[float]:
    fn()
    return [timed(fn)[0] for _ in range(repeats)]


def _forward_backward(op, impl, xs, window, sink_tokens):
    leaves = [x.detach().requires_grad_() for x in xs]
    out = _call(op, impl, leaves, window, sink_tokens)
    out[0].sum().backward()


def bench_kernels(lengths=DEFAULT_LENGTHS, repeats: int = 5, *, heads: int = 9, kv_heads: int = 3, dim: int = 64,
                  window: int = 256, sink_tokens: int = 4, naive_max: int = 4096, naive_backward_max: int = 1024,
                  backward: bool = True, show_progress: bool = False, threads=None) -> list[dict]:
    """Time every op at every length and torch thread count (`threads`, default
    `default_threads()`); one row per (threads, op, T).

    Row keys: threads, op, label, T, heads, kv_heads, dim, window (window op only), chunk_ms (forward
    median), naive_ms (measured or estimated forward median), naive_estimated, naive_basis
    (how naive_ms was obtained), speedup (naive_ms / chunk_ms), chunk_fwd_bwd_ms (None
    without backward), naive_fwd_bwd_ms and fwd_bwd_speedup (measured only up to
    T = naive_backward_max, else None), and the raw seconds of every repeat.
    """
    previous = torch.get_num_threads()
    try:
        rows = []
        for n in threads or default_threads():
            torch.set_num_threads(int(n))
            rows += _bench_at_current_threads(lengths, repeats, heads, kv_heads, dim, window, sink_tokens, naive_max,
                                              naive_backward_max, backward, show_progress)
        return rows
    finally:
        torch.set_num_threads(previous)


def _bench_at_current_threads(lengths, repeats, heads, kv_heads, dim, window, sink_tokens, naive_max,
                              naive_backward_max, backward, show_progress) -> list[dict]:
    rows = []
    n_threads = torch.get_num_threads()
    naive_repeats = max(1, min(repeats, 3))
    for T in sorted(int(t) for t in lengths):
        for op in OPS:
            xs = _inputs(op, T, heads, kv_heads, dim, seed=T)
            with torch.no_grad():
                chunk_s = _time(lambda: _call(op, "chunk", xs, window, sink_tokens), repeats)
                prefix = min(T, naive_max)
                px = [x[:, :prefix] for x in xs]
                _call(op, "naive", [x[:, : min(prefix, 64)] for x in xs], window, sink_tokens)
                naive_s = [timed(lambda: _call(op, "naive", px, window, sink_tokens))[0] for _ in range(naive_repeats)]
            factor = (T / prefix) ** (2 if op == "window" else 1)
            if prefix == T:
                basis = "measured"
            else:
                basis = f"first {prefix} tokens x {T / prefix:g}" + ("^2 (dense T x T)" if op == "window" else " (linear)")
            fb_s = naive_fb_s = None
            if backward:
                fb_s = _time(lambda: _forward_backward(op, "chunk", xs, window, sink_tokens), max(1, repeats // 2))
                if T <= naive_backward_max:
                    naive_fb_s = [timed(lambda: _forward_backward(op, "naive", xs, window, sink_tokens))[0]
                                  for _ in range(naive_repeats)]
            naive_ms = median(naive_s) * factor * 1e3
            chunk_ms = median(chunk_s) * 1e3
            row = {"threads": n_threads, "op": op, "label": LABELS[op], "T": T, "heads": heads, "kv_heads": kv_heads, "dim": dim,
                   "chunk_ms": chunk_ms, "naive_ms": naive_ms, "naive_estimated": prefix != T, "naive_basis": basis,
                   "speedup": naive_ms / chunk_ms,
                   "chunk_fwd_bwd_ms": None if fb_s is None else median(fb_s) * 1e3,
                   "naive_fwd_bwd_ms": None if naive_fb_s is None else median(naive_fb_s) * 1e3,
                   "fwd_bwd_speedup": None if naive_fb_s is None else median(naive_fb_s) / median(fb_s),
                   "chunk_seconds": chunk_s, "naive_seconds": naive_s, "chunk_fwd_bwd_seconds": fb_s,
                   "naive_fwd_bwd_seconds": naive_fb_s}
            if op == "window":
                row.update(window=window, sink_tokens=sink_tokens)
            rows.append(row)
            if show_progress:
                print(f"  {n_threads} thr  {op:10s} T={T:6d}  chunk {chunk_ms:9.1f} ms  naive {naive_ms:10.1f} ms"
                      f"{' (est.)' if prefix != T else ''}  x{naive_ms / chunk_ms:.1f}", file=sys.stderr, flush=True)
    return rows


def kernels_table(rows: list[dict]) -> str:
    header = ["threads", "op", "T", "naive fwd ms", "chunk fwd ms", "fwd speedup", "naive fwd+bwd ms", "chunk fwd+bwd ms",
              "fwd+bwd speedup"]
    body = []
    for r in rows:
        naive = fmt(r["naive_ms"]) + (" (est.)" if r["naive_estimated"] else "")
        fb = "—" if r["fwd_bwd_speedup"] is None else f"{r['fwd_bwd_speedup']:.1f}x"
        body.append([str(r.get("threads", "")), r["label"], str(r["T"]), naive, fmt(r["chunk_ms"]), f"{r['speedup']:.1f}x",
                     fmt(r["naive_fwd_bwd_ms"]), fmt(r["chunk_fwd_bwd_ms"]), fb])
    return markdown_table(header, body, align="rlrrrrrrr")


def kernels_targets(rows: list[dict]) -> list[dict]:
    """The speedup target, per thread count: per-channel chunk_gla forward vs the naive loop at
    T = TARGET_LENGTH."""
    out = []
    for n in sorted({r.get("threads") for r in rows}, key=lambda n: (n is None, n)) or [None]:
        at = [r for r in rows if r.get("threads") == n and r["op"] == "gla" and r["T"] == TARGET_LENGTH]
        where = f"T={TARGET_LENGTH}" + ("" if n is None else f", {n} thread{'s' if n > 1 else ''}")
        out.append(target(f"chunk_gla forward >= {TARGET_SPEEDUP:g}x the naive loop", at[0]["speedup"] if at else None,
                          TARGET_SPEEDUP, where))
    return out


def plot_kernels(rows: list[dict], path: Path) -> Path:
    """Left: forward times of both implementations at the largest thread count; right: the
    speedup at every thread count (solid: the most threads, dashed: fewer)."""
    fig, (ax_t, ax_s) = new_figure(2)
    lengths = sorted({r["T"] for r in rows})
    colors = {"gla": "tab:blue", "gla_scalar": "tab:green", "window": "tab:orange"}
    counts = sorted({r.get("threads") or 0 for r in rows})
    most = counts[-1]
    for n in counts:
        for op in OPS:
            rs = sorted((r for r in rows if r["op"] == op and (r.get("threads") or 0) == n), key=lambda r: r["T"])
            if not rs:
                continue
            xs = [r["T"] for r in rs]
            tag = f" ({n} thr)" if n else ""
            ax_s.plot(xs, [r["speedup"] for r in rs], marker="s", color=colors[op],
                      linestyle="-" if n == most else "--", label=LABELS[op] + tag)
            if n != most:
                continue
            ax_t.plot(xs, [r["chunk_ms"] for r in rs], marker="s", color=colors[op], label=f"{LABELS[op]}: chunk")
            ax_t.plot(xs, [r["naive_ms"] for r in rs], marker="o", linestyle="--", color=colors[op],
                      label=f"{LABELS[op]}: naive")
            est = [r for r in rs if r["naive_estimated"]]
            if est:
                ax_t.scatter([r["T"] for r in est], [r["naive_ms"] for r in est], facecolors="none", edgecolors="k",
                             s=80, zorder=3)
    for ax in (ax_t, ax_s):
        log2_axis(ax, lengths)
        log_y(ax)
        ax.set_xlabel("sequence length T")
    ax_t.set_ylabel("forward ms (median; circled = estimated)")
    ax_t.set_title(f"CPU kernels, fp32{f', {most} threads' if most else ''}")
    ax_t.legend(fontsize=7)
    ax_s.axhline(TARGET_SPEEDUP, color="gray", linestyle=":", label=f"target {TARGET_SPEEDUP:g}x (GLA at {TARGET_LENGTH})")
    ax_s.set_ylabel("naive / chunk (forward)")
    ax_s.set_title("speedup of the chunked kernels")
    ax_s.legend(fontsize=6)
    return save_figure(fig, path)


def run(lengths=DEFAULT_LENGTHS, out_dir: str | Path = DEFAULT_OUT, repeats: int = 5, **kwargs) -> list[dict]:
    """Benchmark, then write kernels_cpu.json / .md / .png into out_dir; returns the rows
    (see `bench_kernels`, which takes the keyword arguments)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = bench_kernels(lengths, repeats, **kwargs)
    plot_kernels(rows, out / "kernels_cpu.png")
    targets = kernels_targets(rows)
    settings = {"lengths": sorted({r["T"] for r in rows}), "repeats": repeats, "dtype": "float32", "batch": 1}
    settings.update({k: v for k, v in rows[0].items() if k in ("heads", "kv_heads", "dim")} if rows else {})
    settings.update({k: v for k, v in kwargs.items() if k != "show_progress"})
    settings["threads"] = sorted({r["threads"] for r in rows})
    notes = ["Forward times are medians after a warm-up, under torch.no_grad(); fwd+bwd is the chunked kernel "
             "with autograd (sum of the output as the loss); the references' fwd+bwd runs only up to "
             "naive_backward_max tokens (the loop reference's autograd graph grows with T^2).",
             "naive (est.): the reference was timed on a prefix and scaled, linearly for the recurrent GLA loop, "
             "quadratically for the dense window reference (its T x T scores do not fit in memory at long T)."]
    report = {"benchmark": "kernels_cpu", "machine": machine_info("cpu"), "settings": settings, "rows": rows,
              "targets": targets, "notes": notes}
    write_report(out, "kernels_cpu", report, kernels_table(rows), "CPU kernels: chunked vs reference")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernels_cpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--naive-max", type=int, default=4096,
                        help="longest T at which the references run in full; longer ones are estimated")
    parser.add_argument("--naive-backward-max", type=int, default=1024,
                        help="longest T at which the references are also timed forward+backward")
    parser.add_argument("--no-backward", action="store_true", help="skip the forward+backward timings")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help=f"torch intra-op thread counts to run at (default: {' and '.join(map(str, default_threads()))})")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.lengths) < 1 or min(args.threads or [1]) < 1:
        parser.error("--repeats, --lengths and --threads must be positive")
    rows = run(args.lengths, args.out, args.repeats, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
               window=args.window, sink_tokens=args.sink_tokens, naive_max=args.naive_max,
               naive_backward_max=args.naive_backward_max, backward=not args.no_backward, show_progress=True,
               threads=args.threads)
    print(kernels_table(rows))
    print("\n".join(target_lines(kernels_targets(rows))))
    print(f"wrote {args.out / 'kernels_cpu.json'}, {args.out / 'kernels_cpu.md'}, {args.out / 'kernels_cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
