"""``linearize eval`` and ``linearize report``: argparse wiring for the CLI.

``linearize/cli.py`` adds the subcommands with ``add_eval_arguments(parser)`` /
``add_report_arguments(parser)`` and dispatches to ``run_eval(args)`` / ``run_report(args)``,
which return a process exit code (0 ok, 2 bad input).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..sparse_cache import add_sparse_cache_arguments
from .runner import METRICS, EvalSettings


def _csv(kind):
    def parse(text: str) -> list:
        if text.strip().lower() in ("", "none"):
            return []
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from e

    return parse


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``linearize eval CHECKPOINT ...``."""
    d = EvalSettings(checkpoint="")
    _add_model_and_tasks(parser, d)
    _add_metrics_and_run(parser, d)
    _add_metric_sizes(parser, d)
    _add_long_context(parser, d)
    _add_seed_and_loading(parser, d)
    return parser


def _add_model_and_tasks(parser: argparse.ArgumentParser, d: EvalSettings) -> None:
    """What is evaluated (checkpoint, adapter) and its lm-eval tasks (tasks, teacher, limit, shots)."""
    parser.add_argument("checkpoint", help="linearized checkpoint folder (or a plain HF model folder)")
    parser.add_argument("--adapter", default=None, help="peft LoRA adapter folder applied on top")
    parser.add_argument("--tasks", type=_csv(str), default=d.tasks,
                        help="comma-separated lm-eval tasks or groups (default: mmlu_local; 'none' "
                             "to skip). piqa, arc_easy, arc_challenge, hellaswag, winogrande need "
                             "hub access or local copies (eval/README.md)")
    parser.add_argument("--teacher", action="store_true",
                        help="also score the original softmax-attention model (linearize.teacher) "
                             "and report recovery %%; a distilled final's merged LoRA is taken back out "
                             "(its lora-delta folder), and where the original weights cannot be had the "
                             "run says so and reports no teacher")
    parser.add_argument("--limit", type=float, default=None,
                        help="lm-eval --limit: documents per task (a fraction if < 1); must be > 0")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="override every task's shots (default: the task's own; mmlu_local is 5-shot)")


def _add_metrics_and_run(parser: argparse.ArgumentParser, d: EvalSettings) -> None:
    """The own metrics to run, the run folder, extra lm-eval task folders, and batch, device, dtype."""
    parser.add_argument("--metrics", type=_csv(str), default=d.metrics,
                        help=f"comma-separated own metrics from {','.join(METRICS)} (default: ppl,agreement; "
                             "'none' to skip). long-doc: perplexity by token position over the first "
                             "--long-doc-tokens of each held-out long document (package pyperformance); "
                             "long-recall: passkey and MQAR at --long-lengths with every key past the window")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/eval/<checkpoint name>-<time>)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="extra lm-eval task folder (repeatable), e.g. local copies of standard tasks")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=d.dtype, help="auto (as saved), float32, bfloat16, float16")


def _add_metric_sizes(parser: argparse.ArgumentParser, d: EvalSettings) -> None:
    """How much each own metric reads: perplexity and agreement texts, passkey and MQAR probes."""
    parser.add_argument("--ppl-texts", type=int, default=d.ppl_texts,
                        help="held-out Wikipedia summaries for perplexity and agreement")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="perplexity window")
    parser.add_argument("--stride", type=int, default=d.stride, help="perplexity window stride")
    parser.add_argument("--agreement-length", type=int, default=d.agreement_length,
                        help="tokens per text for teacher agreement")
    parser.add_argument("--passkey-lengths", type=_csv(int), default=d.passkey_lengths)
    parser.add_argument("--passkey-depths", type=_csv(float), default=d.passkey_depths)
    parser.add_argument("--passkey-trials", type=int, default=d.passkey_trials)
    parser.add_argument("--mqar-pairs", type=_csv(int), default=d.mqar_pairs)
    parser.add_argument("--mqar-samples", type=int, default=d.mqar_samples)


def _add_long_context(parser: argparse.ArgumentParser, d: EvalSettings) -> None:
    """The long-doc and long-recall metrics: document tokens and buckets, prompt lengths, distances."""
    parser.add_argument("--long-doc-tokens", type=int, default=d.long_doc_tokens,
                        help="long-doc: tokens scored per held-out document, in one forward")
    parser.add_argument("--long-doc-buckets", type=_csv(int), default=d.long_doc_buckets,
                        help="long-doc: target-position bucket edges (default: 0,64,512,2048,4096)")
    parser.add_argument("--long-doc-documents", type=int, default=d.long_doc_documents,
                        help="long-doc: score only the first N held-out documents (default: all 8)")
    parser.add_argument("--long-lengths", type=_csv(int), default=d.long_lengths,
                        help="long-recall: passkey and MQAR prompt lengths in tokens")
    parser.add_argument("--long-passkey-depths", type=_csv(float), default=d.long_passkey_depths)
    parser.add_argument("--long-min-distance", type=int, default=d.long_min_distance,
                        help="long-recall: least tokens between every key and its question (beyond "
                             "the model's window); prompts that break it are an error")
    parser.add_argument("--long-mqar-pairs", type=_csv(int), default=d.long_mqar_pairs)
    parser.add_argument("--long-mqar-samples", type=int, default=d.long_mqar_samples)


def _add_seed_and_loading(parser: argparse.ArgumentParser, d: EvalSettings) -> None:
    """The seed, the sparse cache set at load, progress output and non-finite weights."""
    parser.add_argument("--seed", type=int, default=d.seed)
    add_sparse_cache_arguments(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no progress lines on stderr (bars are drawn only on a "
                             "terminal anyway); the tables are still printed")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="load weights that hold NaN or inf instead of refusing them (for inspecting a "
                             "broken model)")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The :class:`EvalSettings` an ``eval`` namespace asks for."""
    return EvalSettings(
        checkpoint=args.checkpoint, tasks=args.tasks, adapter=args.adapter, teacher=args.teacher,
        limit=args.limit, num_fewshot=args.num_fewshot, metrics=args.metrics,
        include_path=args.include_path, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, ppl_texts=args.ppl_texts, max_length=args.max_length, stride=args.stride,
        agreement_length=args.agreement_length, passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials,
        mqar_pairs=args.mqar_pairs, mqar_samples=args.mqar_samples,
        long_doc_tokens=args.long_doc_tokens, long_doc_buckets=args.long_doc_buckets,
        long_doc_documents=args.long_doc_documents, long_lengths=args.long_lengths,
        long_passkey_depths=args.long_passkey_depths, long_min_distance=args.long_min_distance,
        long_mqar_pairs=args.long_mqar_pairs, long_mqar_samples=args.long_mqar_samples, seed=args.seed,
        sparse_cache=args.sparse_cache, sparse_block=args.sparse_block,
        sparse_per_kv_head=args.sparse_per_kv_head, allow_nonfinite=args.allow_nonfinite,
        progress=not args.quiet,
    )


def run_eval(args: argparse.Namespace) -> int:
    """``linearize eval``: run, write the run folder, print the tables. Returns the exit code."""
    from linearize.model_folder import CheckpointError, check_writable

    from .runner import metrics_table, run_evaluation, task_table

    settings = settings_from_args(args)
    out = Path(args.out) if args.out else (
        Path("runs") / "eval" / f"{Path(args.checkpoint).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    log = (lambda msg: None) if args.quiet else (  # noqa: E731
        lambda msg: print(f"[linearize eval] {msg}", file=sys.stderr, flush=True))
    try:
        check_writable(out, 0)  # before the model loads
        results = run_evaluation(settings, out, log=log)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"linearize eval: error: {e}", file=sys.stderr)
        return 2
    if results["tasks"]:
        print(task_table(results) + "\n")
    if results["metrics"]:
        print(metrics_table(results) + "\n")
    print(f"results: {out / 'results.json'}  table: {out / 'results.md'}")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``linearize report RUN_DIR... [--out FILE]``."""
    parser.add_argument("runs", nargs="+", help="run folders written by `linearize eval` (or their results.json)")
    parser.add_argument("--out", default="report.md", help="markdown file to write (default: report.md)")
    parser.add_argument("--title", default="linearize evaluation report")
    return parser


def run_report(args: argparse.Namespace) -> int:
    """``linearize report``: merge run folders into one markdown report. Returns the exit code."""
    from linearize.model_folder import CheckpointError, check_writable

    from .report import write_report

    try:
        check_writable(Path(args.out), 0)
        path = write_report(args.runs, args.out, title=args.title)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"linearize report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
