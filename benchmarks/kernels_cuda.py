"""CUDA kernel benchmark: the Triton kernels against torch SDPA and flash-linear-attention.

For each shape B x T x H x D (bf16, H query heads = H key/value heads):

1. Correctness first, at the benchmark shape: the forward of every Triton kernel against an
   fp64 reference computed without Triton (the naive GLA loop, a banded window reference,
   both combined for the hybrid), and forward + every gradient on the first `check_tokens`
   tokens against the fp64 naive references with autograd. Relative errors must stay under
   2e-2 (bf16); a failure is reported and makes the exit code 1.
2. Timing: forward (under no_grad) and forward + backward (autograd.grad of all inputs) of
   SDPA (full causal softmax, flash backend where available), fla's chunk_gla (if
   importable), our GLA (per-channel and per-head gates), our window attention (window 64,
   4 sink tokens), our fused hybrid (Liger Attention: 0.5 window 64 + 0.5 GLA), and, unfused,
   SDPA followed by our GLA and our window followed by our GLA. CUDA events, warm-up runs,
   median of `repeats` runs. The first call of each Triton kernel autotunes (a few minutes).

Writes kernels_cuda.json (machine: GPU, versions, date; every measurement and check),
kernels_cuda.md and kernels_cuda.png into --out.

    python benchmarks/kernels_cuda.py --out DIR [--repeats 20] [--lengths 4096 16384]

Targets (fwd + bwd): our GLA <= fla chunk_gla; hybrid <= 1.25x our GLA and faster than SDPA +
GLA run separately; at T = 16384 our GLA and the hybrid >= 2x faster than SDPA.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.eval.bench.machine import machine_info
from linearize.eval.bench.report import markdown_table, target, target_lines, write_report
from linearize.eval.bench.timing import median
from linearize.plots import log_y, new_figure, save_figure

SHAPES = ((1, 8192, 32, 128), (4, 4096, 32, 128), (4, 2048, 16, 128), (2, 16384, 16, 128))
DEFAULT_LENGTHS = tuple(sorted({s[1] for s in SHAPES}))
DEFAULT_OUT = Path("outputs/bench/kernels_cuda")
DEFAULT_REPEATS = 20
WINDOW, SINKS = 64, 4
DRY_RUN_SHAPE = (1, 80, 2, 16)  # longer than the window, one partial chunk: every code path, in seconds
TOLERANCE = 2e-2
METHODS = ("sdpa", "fla_chunk_gla", "gla", "gla_scalar", "window", "hybrid", "sdpa+gla", "window+gla")
LABELS = {"sdpa": "SDPA causal", "fla_chunk_gla": "fla chunk_gla", "gla": "ours GLA (per-channel)",
          "gla_scalar": "ours GLA (per-head)", "window": f"ours window {WINDOW} + {SINKS} sinks",
          "hybrid": f"ours hybrid (window {WINDOW} + GLA, fused)", "sdpa+gla": "SDPA + ours GLA, separate",
          "window+gla": "ours window + ours GLA, separate"}


def _no_cuda_message() -> str:
    return ("kernels_cuda needs a CUDA GPU (torch.cuda.is_available() is False here). "
            "On a CPU machine run `python benchmarks/kernels_cpu.py` instead; the Triton kernels "
            "themselves are tested on the CPU with TRITON_INTERPRET=1 (tests/kernels/test_triton_*.py).")


def shapes_for(lengths) -> list[tuple[int, int, int, int]]:
    """The default shapes whose T is in `lengths`, plus B=1, H=32, D=128 for any other T."""
    lengths = [int(t) for t in lengths]
    chosen = [s for s in SHAPES if s[1] in lengths]
    chosen += [(1, t, 32, 128) for t in lengths if t not in {s[1] for s in SHAPES}]
    return chosen


def _fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception:
        return None
    params = inspect.signature(chunk_gla).parameters
    extra = {"head_first": False} if "head_first" in params else {}
    return lambda q, k, v, g, scale: chunk_gla(q, k, v, g, scale=scale, **extra)[0]


def make_inputs(B, T, H, D, seed=0, device="cuda", dtype=torch.bfloat16) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32)
    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    # Liger-style features and gates: softmax over the head dim, log decay logsigmoid(k) / 16
    x = {"q": q, "k": k, "v": v, "q_lin": q.softmax(-1), "k_lin": k.softmax(-1),
         "g": F.logsigmoid(k) / 16, "g_scalar": F.logsigmoid(k.mean(-1)) / 16}
    return {name: t.to(dtype) if name not in ("g", "g_scalar") else t for name, t in x.items()}


def calls(x: dict) -> dict:
    """name -> (function of the inputs dict returning output tensors, input names it differentiates)."""
    from linearize.kernels.gla.triton_chunk import triton_chunk_gla
    from linearize.kernels.hybrid.triton_chunk import triton_hybrid_attention
    from linearize.kernels.window.triton_chunk import triton_window_attention

    def sdpa(a):
        o = F.scaled_dot_product_attention(a["q"].transpose(1, 2), a["k"].transpose(1, 2), a["v"].transpose(1, 2),
                                           is_causal=True)
        return [o]

    gla = lambda a: [triton_chunk_gla(a["q_lin"], a["k_lin"], a["v"], a["g"])[0]]
    gla_scalar = lambda a: [triton_chunk_gla(a["q_lin"], a["k_lin"], a["v"], a["g_scalar"])[0]]
    window = lambda a: [triton_window_attention(a["q"], a["k"], a["v"], window=WINDOW, num_sink_tokens=SINKS)[0]]
    hybrid = lambda a: [triton_hybrid_attention(a["q"], a["k"], a["v"], a["q_lin"], a["k_lin"], a["g"], window=WINDOW,
                                                mode="mix")[0]]
    table = {
        "sdpa": (sdpa, ["q", "k", "v"]),
        "gla": (gla, ["q_lin", "k_lin", "v", "g"]),
        "gla_scalar": (gla_scalar, ["q_lin", "k_lin", "v", "g_scalar"]),
        "window": (window, ["q", "k", "v"]),
        "hybrid": (hybrid, ["q", "k", "v", "q_lin", "k_lin", "g"]),
        "sdpa+gla": (lambda a: sdpa(a) + gla(a), ["q", "k", "v", "q_lin", "k_lin", "g"]),
        "window+gla": (lambda a: window(a) + gla(a), ["q", "k", "v", "q_lin", "k_lin", "g"]),
    }
    fla = _fla_chunk_gla()
    if fla is not None:
        table["fla_chunk_gla"] = (lambda a: [fla(a["q_lin"], a["k_lin"], a["v"], a["g"], 1.0)],
                                  ["q_lin", "k_lin", "v", "g"])
    return table


# -- correctness ---------------------------------------------------------------------------
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def band_window_reference(q, k, v, window: int, sinks: int, block: int = 1024):
    """fp64 window attention with sink tokens, one query block at a time over its key band
    (the dense reference's T x T scores do not fit at benchmark lengths). Returns o, lse."""
    B, T, H, D = q.shape
    scale = D ** -0.5
    o = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float64, device=q.device)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        lo = max(0, t0 - window + 1)
        keys = torch.cat([torch.arange(min(sinks, lo), device=q.device), torch.arange(lo, t1, device=q.device)])
        t = torch.arange(t0, t1, device=q.device)
        allowed = (keys[None, :] <= t[:, None]) & ((t[:, None] - keys[None, :] < window) | (keys[None, :] < sinks))
        s = torch.einsum("bthd,bshd->bhts", q[:, t0:t1].double(), k[:, keys].double()) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row = torch.logsumexp(s, -1)
        o[:, t0:t1] = torch.einsum("bhts,bshd->bthd", torch.exp(s - row[..., None]), v[:, keys].double())
        lse[:, t0:t1] = row.transpose(1, 2)
    return o, lse


def check_shape(x: dict, check_tokens: int) -> dict:
    """Relative errors of every Triton kernel at this shape (forward: full length; forward and
    gradients: the first check_tokens tokens), against fp64 references without Triton."""
    from linearize.kernels.gla.naive import naive_gla
    from linearize.kernels.hybrid import combine_hybrid, naive_hybrid_attention
    from linearize.kernels.window.naive import naive_window_attention

    ours = calls(x)
    out = {}
    with torch.no_grad():
        d = {n: t.double() for n, t in x.items()}
        ref_gla = {gname: naive_gla(d["q_lin"], d["k_lin"], d["v"], d[gname])[0] for gname in ("g", "g_scalar")}
        ref_win, ref_lse = band_window_reference(x["q"], x["k"], x["v"], WINDOW, SINKS)
        ref_win_plain, ref_lse_plain = band_window_reference(x["q"], x["k"], x["v"], WINDOW, 0)
        half = torch.full((x["q"].shape[2],), 0.5, dtype=torch.float64, device=x["q"].device)
        ref_hyb = combine_hybrid(ref_win_plain, ref_lse_plain, ref_gla["g"], mode="mix", w_win=half, w_lin=half, c=half)
        refs = {"gla": ref_gla["g"], "gla_scalar": ref_gla["g_scalar"], "window": ref_win, "hybrid": ref_hyb}
        for name, ref in refs.items():
            out[f"{name}/forward"] = _rel(ours[name][0](x)[0], ref)
        del d, refs, ref_gla
    n = min(check_tokens, x["q"].shape[1])
    short = {name: t[:, :n].detach().clone().requires_grad_() for name, t in x.items()}
    gen = torch.Generator(device=x["q"].device).manual_seed(1)
    do = torch.randn(short["q"].shape, generator=gen, device=x["q"].device)
    naive = {
        "gla": lambda a: naive_gla(a["q_lin"], a["k_lin"], a["v"], a["g"])[0],
        "gla_scalar": lambda a: naive_gla(a["q_lin"], a["k_lin"], a["v"], a["g_scalar"])[0],
        "window": lambda a: naive_window_attention(a["q"], a["k"], a["v"], window=WINDOW, num_sink_tokens=SINKS)[0],
        "hybrid": lambda a: naive_hybrid_attention(a["q"], a["k"], a["v"], a["q_lin"], a["k_lin"], a["g"],
                                                   window=WINDOW, mode="mix")[0],
    }
    for name, ref_fn in naive.items():
        fn, names = ours[name]
        o = fn(short)[0]
        grads = torch.autograd.grad((o.float() * do).sum(), [short[k] for k in names])
        d = {k: t.detach().double().requires_grad_() for k, t in short.items()}
        ro = ref_fn(d)
        ref_grads = torch.autograd.grad((ro * do.double()).sum(), [d[k] for k in names])
        out[f"{name}/forward@{n}"] = _rel(o, ro)
        for k, gr, rg in zip(names, grads, ref_grads):
            out[f"{name}/d{k}@{n}"] = _rel(gr, rg)
    return out


# -- timing --------------------------------------------------------------------------------
def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls (CUDA events; a wall clock for the CPU dry run), after
    `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_shape(x: dict, warmup: int, repeats: int) -> dict:
    """{method: {"fwd_ms", "fwd_bwd_ms", "fwd_times", "fwd_bwd_times", "error"}} at one shape."""
    rows = {}
    for name, (fn, names) in calls(x).items():
        row = {"fwd_ms": None, "fwd_bwd_ms": None, "error": None}
        try:
            with torch.no_grad():
                t = time_calls(lambda: fn(x), warmup, repeats)
            row.update(fwd_ms=median(t), fwd_times=t)
            leaves = {k: x[k].detach().requires_grad_() for k in names}
            args = {**x, **leaves}
            outs = fn(args)
            grads = [torch.randn_like(o) for o in outs]
            del outs

            def fwd_bwd():
                torch.autograd.grad(fn(args), list(leaves.values()), grads)

            t = time_calls(fwd_bwd, warmup, repeats)
            row.update(fwd_bwd_ms=median(t), fwd_bwd_times=t)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # noqa: BLE001 - recorded per method, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
        rows[name] = row
    return rows


# -- report --------------------------------------------------------------------------------
def _shape_label(s) -> str:
    return "x".join(str(v) for v in s)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def build_targets(results: list[dict]) -> list[dict]:
    targets = []
    for r in results:
        m, at = r["timings"], f"B.T.H.D={_shape_label(r['shape'])}"
        fb = {k: v["fwd_bwd_ms"] for k, v in m.items()}
        if "fla_chunk_gla" in fb:
            targets.append(target("our GLA fwd+bwd <= fla chunk_gla (fla ms / ours ms >= 1)",
                                  _ratio(fb.get("fla_chunk_gla"), fb.get("gla")), 1.0, at))
        targets.append(target("hybrid fwd+bwd <= 1.25x our GLA (GLA ms / hybrid ms >= 0.8)",
                              _ratio(fb.get("gla"), fb.get("hybrid")), 0.8, at))
        targets.append(target("hybrid fwd+bwd faster than SDPA + GLA separately",
                              _ratio(fb.get("sdpa+gla"), fb.get("hybrid")), 1.0, at))
        if r["shape"][1] >= 16384:
            for name in ("gla", "hybrid"):
                targets.append(target(f"{name} fwd+bwd >= 2x faster than SDPA", _ratio(fb.get("sdpa"), fb.get(name)),
                                      2.0, at))
    return targets


def results_table(results: list[dict]) -> str:
    header = ["B.T.H.D", "method", "fwd ms", "fwd+bwd ms", "SDPA / this (fwd+bwd)", "this / our GLA (fwd+bwd)"]
    body = []
    f = lambda v: "—" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}"
    for r in results:
        m = r["timings"]
        sdpa, gla = m.get("sdpa", {}).get("fwd_bwd_ms"), m.get("gla", {}).get("fwd_bwd_ms")
        for name in METHODS:
            if name not in m:
                continue
            row = m[name]
            if row["error"]:
                body.append([_shape_label(r["shape"]), LABELS[name], row["error"], "", "", ""])
                continue
            sr, gr = _ratio(sdpa, row["fwd_bwd_ms"]), _ratio(row["fwd_bwd_ms"], gla)
            body.append([_shape_label(r["shape"]), LABELS[name], f(row["fwd_ms"]), f(row["fwd_bwd_ms"]),
                         "—" if sr is None else f"{sr:.2f}x", "—" if gr is None else f"{gr:.2f}x"])
    return markdown_table(header, body, align="llrrrr")


def checks_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for key, err in r["checks"].items():
            rows.append([_shape_label(r["shape"]), key, f"{err:.2e}", "ok" if err < TOLERANCE else "FAILED"])
    return markdown_table(["B.T.H.D", "kernel/quantity", "rel. error vs fp64", f"< {TOLERANCE:g}"], rows, align="llrl")


def plot(results: list[dict], path: Path) -> Path:
    fig, axes = new_figure(2, width=6.5, height=4.2)
    labels = [_shape_label(r["shape"]) for r in results]
    present = [m for m in METHODS if any(m in r["timings"] for r in results)]
    width = 0.8 / max(1, len(present))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
        for i, name in enumerate(present):
            xs, ys = [], []
            for j, r in enumerate(results):
                v = r["timings"].get(name, {}).get(key)
                if v is not None:
                    xs.append(j + (i - (len(present) - 1) / 2) * width)
                    ys.append(v)
            if xs:
                ax.bar(xs, ys, width=width, color=f"C{METHODS.index(name)}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_xlabel("B x T x H x D (bf16)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        log_y(ax)
    from matplotlib.patches import Patch

    axes[1].legend(handles=[Patch(color=f"C{METHODS.index(m)}", label=LABELS[m]) for m in present], fontsize=6)
    return save_figure(fig, path)


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "triton", "flash-linear-attention", "fla-core"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run(lengths=DEFAULT_LENGTHS, out_dir: str | Path = DEFAULT_OUT, repeats: int = DEFAULT_REPEATS, *,
        warmup: int = 3, check_tokens: int = 512, seed: int = 0, show_progress: bool = True,
        shapes=None, device: str = "cuda") -> list[dict]:
    """Check, then time every method at the shapes selected by `lengths` (see `shapes_for`) or
    given as `shapes` [(B, T, H, D), ...]; write kernels_cuda.json / .md / .png into out_dir
    after every shape (a run cut short keeps what it finished) and return one result per shape.

    device="cpu" is a dry run of the whole script in the Triton interpreter (TRITON_INTERPRET=1,
    tiny `shapes`): it checks the benchmark itself, its timings mean nothing."""
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("a CPU dry run of kernels_cuda needs TRITON_INTERPRET=1 set before Triton is imported")
    elif not torch.cuda.is_available():
        raise RuntimeError(_no_cuda_message())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(s) for s in shapes] if shapes else shapes_for(lengths)
    machine = machine_info(device)
    if device != "cpu":
        props = torch.cuda.get_device_properties(0)
        machine.update(gpu_capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count)
    machine.update(versions=_versions(), fla_chunk_gla_available=_fla_chunk_gla() is not None)
    results = []
    for shape in shapes:
        B, T, H, D = shape
        x = make_inputs(B, T, H, D, seed=seed, device=device)
        if show_progress:
            print(f"[{_shape_label(shape)}] checking against the fp64 references ...", file=sys.stderr, flush=True)
        checks = check_shape(x, check_tokens)
        failed = {k: v for k, v in checks.items() if not v < TOLERANCE}
        if show_progress:
            print(f"[{_shape_label(shape)}] worst relative error {max(checks.values()):.2e}"
                  + (f"; FAILED: {failed}" if failed else "") + "; timing (first calls autotune) ...",
                  file=sys.stderr, flush=True)
        timings = time_shape(x, warmup, repeats)
        results.append({"shape": list(shape), "checks": checks, "checks_failed": sorted(failed), "timings": timings})
        del x
        torch.cuda.empty_cache()
        _write(out, results, machine, shapes, repeats, warmup, check_tokens)
    return results


def _write(out: Path, results: list[dict], machine: dict, shapes, repeats: int, warmup: int, check_tokens: int):
    plot(results, out / "kernels_cuda.png")
    notes = ["Times: median of CUDA-event timings after warm-up; forward under torch.no_grad(); fwd+bwd = one "
             "forward plus torch.autograd.grad of every input. The hybrid's backward recomputes both branches "
             "through the separate window and GLA kernels (its forward is one fused launch after the chunk-state "
             "kernel).",
             "Correctness (before timing, same shapes):", "", checks_table(results)]
    if len(results) < len(shapes):
        notes.insert(0, f"Partial: {len(results)} of {len(shapes)} shapes done when this was written.")
    report = {"benchmark": "kernels_cuda",
              "machine": machine,
              "settings": {"shapes": [list(s) for s in shapes], "dtype": "bfloat16", "repeats": repeats,
                           "warmup": warmup, "window": WINDOW, "sink_tokens": SINKS, "check_tokens": check_tokens,
                           "tolerance": TOLERANCE, "complete": len(results) == len(shapes)},
              "rows": results, "targets": build_targets(results), "notes": notes}
    write_report(out, "kernels_cuda", report, results_table(results),
                 f"CUDA kernels: {machine.get('gpu', machine.get('device', 'GPU'))}, bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernels_cuda.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="run the default shapes with these T (others run at B=1, H=32, D=128)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per point (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--check-tokens", type=int, default=512, help="prefix length of the gradient checks")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the whole script on the CPU at a tiny shape in the Triton interpreter (needs "
                             "TRITON_INTERPRET=1 in the environment): checks the benchmark, not the GPU")
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print(_no_cuda_message(), file=sys.stderr)
        return 2
    dry = dict(shapes=[DRY_RUN_SHAPE], device="cpu") if args.dry_run else {}
    results = run(args.lengths, args.out, args.repeats, warmup=args.warmup, check_tokens=args.check_tokens, **dry)
    print(results_table(results))
    print()
    print(checks_table(results))
    print()
    for line in target_lines(build_targets(results)):
        print(line)
    print(f"\nwrote {args.out / 'kernels_cuda.md'}, {args.out / 'kernels_cuda.json'}, {args.out / 'kernels_cuda.png'}")
    return 1 if any(r["checks_failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
