"""`linearize distill RECIPE [key=value ...]`: argument wiring shared by the CLI and `python -m`."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the distill arguments: the recipe path, `key=value` overrides, --print-recipe."""
    parser.add_argument("recipe", help="YAML recipe (see recipes/, e.g. recipes/smollm2-cpu-liger.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides with dotted keys, e.g. stage2.optimizer.lr=2e-4 seq_len=512 resume=true")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the recipe with the overrides applied and exit without training")


def run_distill(args: argparse.Namespace) -> int:
    """Run a distillation from parsed arguments; returns the process exit code."""
    from .checkpointing import CheckpointMissingError
    from .recipe import RecipeError, load_recipe
    from .train import DistillError, distill

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            print(recipe.to_yaml(), end="")
            return 0
        distill(recipe)
    except (RecipeError, ConfigError, DistillError, CheckpointMissingError) as e:
        print(f"linearize distill: error: {e}", file=sys.stderr)
        return 2
    return 0
