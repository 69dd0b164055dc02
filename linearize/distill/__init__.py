"""Distillation: stage-1 attention transfer and stage-2 LoRA recovery from a YAML recipe.

    from linearize.distill import load_recipe, distill
    final_dir = distill(load_recipe("recipes/smollm2-cpu-lizard.yaml", ["output_dir=runs/x"]))

Command line: `linearize distill RECIPE [key=value ...]`, or under accelerate
`accelerate launch [--config_file recipes/accelerate/ddp_8gpu.yaml] -m linearize.distill RECIPE`.
"""
from .data import DataError, TokenRows, build_rows
from .recipe import Recipe, RecipeError, load_recipe
from .train import DistillError, distill

__all__ = ["Recipe", "RecipeError", "DataError", "DistillError", "load_recipe", "distill", "build_rows", "TokenRows"]
