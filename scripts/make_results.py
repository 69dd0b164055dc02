"""Regenerate docs/results.md: train, evaluate and benchmark every method on the embedded model.

    python scripts/make_results.py                       # everything, into docs/results.md
    python scripts/make_results.py --methods lizard --stage2-tokens 65536
    python scripts/make_results.py --refresh-quality     # the quality-at-length table only

Each step's output is kept under --work-dir (default outputs/results) and skipped when it
exists, so an interrupted run continues; the pipeline is in scripts/results/ (`run` for the
steps, `render` for the document).
"""
import argparse
import sys
from pathlib import Path

from results.quality import refresh_quality_section
from results.run import ResultsRun
from results.settings import ENTRY_BY_NAME, STEPS, ResultsSettings


def main(argv: list[str] | None = None) -> int:
    d = ResultsSettings()
    ap = argparse.ArgumentParser(description="Train, evaluate and benchmark every method on one model and write "
                                             "the results document (docs/results.md).")
    ap.add_argument("--model", help="plain HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--work-dir", default=d.work_dir, help=f"where every step's files go (default {d.work_dir})")
    ap.add_argument("--doc", default=d.doc, help=f"the markdown file to write (default {d.doc})")
    ap.add_argument("--methods", nargs="+", default=d.methods, choices=list(ENTRY_BY_NAME), metavar="METHOD",
                    help=f"rows to produce (default all: {', '.join(ENTRY_BY_NAME)})")
    for name in ("stage1_tokens", "stage2_tokens", "seq_len", "gradient_accumulation_steps", "ppl_texts",
                 "long_texts", "long_length", "speed_length", "speed_repeats", "decode_steps", "bench_repeats"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--mmlu-limit", type=int, default=d.mmlu_limit, help="questions per MMLU subject (0: skip MMLU)")
    for name in ("passkey_lengths", "prefill_lengths", "decode_contexts", "train_lengths", "kernel_lengths"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="+", default=getattr(d, name))
    ap.add_argument("--extra-runs", nargs="+", default=[], metavar="RUN_DIR",
                    help="finished `linearize distill` output folders to evaluate and list as longer runs")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--redo", nargs="+", default=[], choices=STEPS, help="steps to run again even if their files exist")
    ap.add_argument("--skip", nargs="+", default=[], choices=STEPS,
                    help="steps not to run now (earlier files are still shown; missing ones appear as —)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--refresh-quality", action="store_true",
                    help="only rewrite the document's quality-at-length section from the quality pages' records")
    args = ap.parse_args(argv)
    if args.refresh_quality:
        print(f"wrote {refresh_quality_section(Path(args.doc))}")
        return 0
    values = vars(args)
    values.pop("refresh_quality")
    values["progress"] = not values.pop("no_progress")
    values["mmlu_limit"] = values["mmlu_limit"] or None
    try:
        doc = ResultsRun(ResultsSettings(**values)).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"make_results: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
