"""``linearize bench``: argparse wiring for the benchmarks.

``linearize/cli.py`` adds the subcommand with ``add_bench_arguments(parser)`` and dispatches
to ``run_bench(args)``, which returns a process exit code (0 ok, 1 a measured target missed
under ``--check``, 2 bad input). Prefill, decode and train are part of the package; the kernel
microbenchmarks are scripts in ``benchmarks/`` of a source checkout, which ``kernels`` runs
when it finds them (`kernel_benchmark`).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from .report import target_lines

BENCHMARKS = ("prefill", "decode", "train", "kernels")
CHOICES = BENCHMARKS + ("all",)
DEFAULT_OUT = Path("outputs") / "bench"
# eval/bench/ -> the checkout's root; after a wheel install this folder does not exist
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def _int_list(text: str) -> list[int]:
    try:
        values = [_length(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated lengths like 1024,4096 or 1k,4k; got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``linearize bench {prefill,decode,train,kernels,all} ...``."""
    from linearize.config import METHODS

    parser.description = ("Benchmarks, teacher (the original softmax attention, same weights) beside student: "
                          "prefill time and peak memory, decode ms/token and cache memory, LoRA training "
                          "throughput, kernel microbenchmarks. Each writes a markdown table, JSON and a PNG plot.")
    parser.add_argument("which", choices=CHOICES,
                        help="prefill: one forward vs length (default 512..16k); decode: ms/token and cache bytes "
                             "at context 1k, 4k, 16k; train: LoRA r=8 q,k,v step at 512, 2048; kernels: the kernel "
                             "microbenchmarks in benchmarks/ of a source checkout; all: every one of them")
    parser.add_argument("--model", default=None,
                        help="local Hugging Face folder (plain or linearized) or hub id "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="conversion method for a plain model (default: liger-gla)")
    parser.add_argument("--config", default=None,
                        help="a full LinearizeConfig as JSON text or a JSON file, instead of --method")
    parser.add_argument("--lengths", type=_int_list, default=None,
                        help="comma-separated sequence (decode: context) lengths, e.g. 1k,4k,16k,32k "
                             "(default: per benchmark)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per point, median quoted (default 3); decode: timed single-token "
                             "steps per context (default 32)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: {DEFAULT_OUT}/<which>; for all, one subfolder per benchmark)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default 1)")
    parser.add_argument("--prefill-chunk", type=int, default=2048,
                        help="decode: tokens per forward when filling the caches (default 2048)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a measured target (3x prefill and decode speed at 16k, "
                             "100x smaller cache at 16k, 0.8x training throughput at 512) is missed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_arg(text: str):
    """A LinearizeConfig from JSON text or a JSON file path."""
    from linearize.config import LinearizeConfig

    if text.lstrip().startswith("{"):
        try:
            return LinearizeConfig.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON ({e})") from e
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--config {text!r}: neither JSON text nor an existing file")
    return LinearizeConfig.from_json_file(path)


def load_bench_model(model: str | None, method: str | None = None, config: str | None = None,
                     dtype: str | None = None, device: str | None = None):
    """A linearized model ready to benchmark: load `model` (None = the embedded SmolLM2), convert
    it with `config` (JSON text or file) or `method` unless it is already linearized, move it
    to `device` and put it in eval mode."""
    import torch

    import linearize
    from linearize.model_folder import load_base_model

    if method and config:
        raise ValueError("pass either --method or --config, not both")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    loaded, _, name = load_base_model(model, dtype)
    if linearize.is_linearized(loaded):
        if method or config:
            raise ValueError(f"{name} is already linearized ({loaded.config.linearize['method']}); "
                             "drop --method/--config, or pass the plain model")
    else:
        cfg = config_from_arg(config) if config else linearize.LinearizeConfig(method=method or "liger-gla")
        linearize.convert(loaded, cfg)
    return loaded.to(device).eval()


def _default(fn, name: str, fallback):
    p = inspect.signature(fn).parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def kernel_benchmark(kind: str):
    """The module of ``benchmarks/kernels_<kind>.py`` (kind: cpu or cuda) of this source checkout,
    loaded once. Raises FileNotFoundError where the package was installed without the checkout."""
    name = f"linearize_benchmarks_kernels_{kind}"
    if name in sys.modules:
        return sys.modules[name]
    path = BENCHMARKS_DIR / f"kernels_{kind}.py"
    if not path.is_file():
        raise FileNotFoundError(f"the {kind} kernel benchmark is a script of the source checkout "
                                f"(benchmarks/kernels_{kind}.py), not part of the installed package: run "
                                "`linearize bench kernels` from an editable install of a clone "
                                f"(pip install -e .), or `python benchmarks/kernels_{kind}.py` there")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_kernels(lengths: list[int] | None, out_dir: str | Path, repeats: int | None, device: str | None = None) -> dict:
    """Kernel microbenchmarks: ``benchmarks/kernels_cpu.py`` always, ``kernels_cuda.py`` too on
    CUDA (into out_dir/cuda). Returns {"cpu": ..., "cuda": ...} with whatever each returned."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    results = {}
    targets = [("cpu", out)] + ([("cuda", out / "cuda")] if device.type == "cuda" else [])
    for kind, where in targets:
        module = kernel_benchmark(kind)
        n = lengths or list(_default(module.run, "lengths", getattr(module, "DEFAULT_LENGTHS", (1024, 4096, 16384))))
        r = repeats or _default(module.run, "repeats", 3)
        where.mkdir(parents=True, exist_ok=True)
        results[kind] = module.run(n, where, r)
    return results


def _print_report(report: dict, table: str) -> None:
    print(f"\n## {report['benchmark']}\n\n{table}\n")
    for line in target_lines(report["targets"]):
        print(line)
    files = report["files"]
    print("wrote " + ", ".join(files[k] for k in ("markdown", "json", "plot") if k in files), flush=True)


def run_bench(args: argparse.Namespace) -> int:
    """``linearize bench``: run the chosen benchmarks, write their files, print tables and targets."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"linearize bench: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch_size < 1 or args.prefill_chunk < 1:
        raise ValueError("--batch-size and --prefill-chunk must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = BENCHMARKS if args.which == "all" else (args.which,)
    root = Path(args.out) if args.out else (DEFAULT_OUT if args.which == "all" else DEFAULT_OUT / args.which)
    out_of = (lambda name: root / name) if args.which == "all" else (lambda name: root)
    show = not args.no_progress
    kw = {"batch_size": args.batch_size, "show_progress": show}
    model = None
    if any(b != "kernels" for b in chosen):
        model = load_bench_model(args.model, args.method, args.config, args.dtype, args.device)
    targets = []
    for name in chosen:
        if name == "prefill":
            from .prefill import DEFAULT_LENGTHS, prefill_table, run_prefill

            report = run_prefill(model, out_of(name), args.lengths or DEFAULT_LENGTHS, args.repeats or 3, **kw)
            _print_report(report, prefill_table(report["rows"]))
        elif name == "decode":
            from .decode import DEFAULT_CONTEXTS, decode_table, run_decode

            report = run_decode(model, out_of(name), args.lengths or DEFAULT_CONTEXTS, steps=args.repeats or 32,
                                prefill_chunk=args.prefill_chunk, **kw)
            _print_report(report, decode_table(report["rows"]))
        elif name == "train":
            from .train import DEFAULT_LENGTHS, run_train, train_table

            report = run_train(model, out_of(name), args.lengths or DEFAULT_LENGTHS, args.repeats or 3, **kw)
            _print_report(report, train_table(report["rows"]))
        else:
            try:
                results = run_kernels(args.lengths, out_of(name), args.repeats, args.device)
            except FileNotFoundError as e:
                if args.which != "all":
                    raise
                print(f"kernels: skipped: {e}", file=sys.stderr, flush=True)
                continue
            for kind, result in results.items():
                if isinstance(result, str):
                    print(f"\n## kernels ({kind})\n\n{result}\n")
            print(f"kernels: results in {out_of(name)}", flush=True)
            continue
        targets += report["targets"]
    if args.which == "all" and targets:
        lines = target_lines(targets)
        (root / "summary.md").write_text("# linearize bench: targets\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
        print("\n" + "\n".join(lines) + f"\nwrote {root / 'summary.md'}")
    if args.check and any(t["met"] is False for t in targets):
        print("linearize bench: a measured target was missed (--check)", file=sys.stderr)
        return 1
    return 0
