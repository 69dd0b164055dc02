"""Regenerate docs/results.md: train, evaluate and benchmark every method on the embedded model.

    python scripts/make_results.py [--methods ...] [--stage2-tokens N] [--work-dir DIR] [--doc FILE]

Each step's output is kept under --work-dir (default outputs/results) and skipped when it
exists, so an interrupted run continues; see `linearize.eval.results` for the pipeline.
"""
import sys

from linearize.eval.results import main

if __name__ == "__main__":
    sys.exit(main())
