"""`accelerate launch -m linearize.distill RECIPE [key=value ...]` (or `python -m linearize.distill`)."""
from __future__ import annotations

import argparse
import sys

from .cli_commands import add_distill_arguments, run_distill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.distill",
                                     description="Two-stage recovery of a linearized model from a YAML recipe.")
    add_distill_arguments(parser)
    return run_distill(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
