"""The model card (README.md) written beside a converted or distilled model: what it is, how it
was made and how to load it, with the library's own tools and with the stock ones."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch.nn as nn

from .summary import summarize

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_card(model: nn.Module, name: str, *, base: str, training: str | None = None) -> str:
    """README.md text for the linearized `model` saved as the folder `name`.

    base: the model it was converted from (hub id or folder); training: a sentence on how it
    was distilled, or None for an untrained conversion.
    """
    summary = summarize(model)
    spec = model.config.linearize
    front = ["---", "library_name: transformers", "tags:", "- linearize", "- linear-attention", f"- {spec['method']}"]
    if HUB_ID.match(base) and not Path(base).exists():
        front.append(f"base_model: {base}")
    front.append("---")
    trained = training or ("Not trained: the conversion alone. Distill it with `linearize distill` (a recipe with "
                           f"`model.path: {name}` and `linearize: null`) to recover quality.")
    return "\n".join([
        *front, "",
        f"# {name}", "",
        f"`{base}` with its attention linearized by the `linearize` toolkit: {summary.method}.", "",
        "```", *summary.lines(), "```", "",
        f"**Training.** {trained}", "",
        "**Conversion** (`linearize` in config.json):", "",
        "```json", json.dumps(spec, indent=2), "```", "",
        "## Load", "",
        "```python",
        "import linearize",
        f'model = linearize.load("{name}")            # constant-memory decoding with model.generate()',
        "",
        "# or, where linearize is installed but not imported:",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        "```", "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks TASKS",
        f"linearize eval {name} --metrics long-doc,long-recall --teacher   # beside the original attention",
        "```", "",
    ])


def write_model_card(model: nn.Module, folder: Path, *, name: str, base: str, training: str | None = None) -> None:
    """Write README.md into `folder` (saved as `name`) unless one is there already."""
    card = Path(folder) / "README.md"
    if not card.exists():
        card.write_text(model_card(model, name, base=base, training=training))
