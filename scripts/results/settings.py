"""What the results document is made of: the method rows, the budgets and the steps.

`RECIPES_DIR` is the recipes/ folder of this checkout: the pipeline is a script of the source
tree (scripts/), not part of the installed package, so reading the recipes beside it is safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STEPS = ("train", "untrained", "eval", "long_ppl", "speed", "bench")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class MethodEntry:
    """One row of the results: a conversion and the recipe that trains it.

    recipe: a file in recipes/ whose settings are used (budgets and lengths replaced by the
    settings'); None for the zero-training baseline.
    """

    name: str
    title: str
    config: dict
    recipe: str | None

    def resolved_config(self, num_layers: int) -> dict:
        """The LinearizeConfig fields for a model of `num_layers` layers: `softmax_layers:
        "first-and-middle"` becomes [0, num_layers // 2]."""
        config = dict(self.config)
        if config.get("softmax_layers") == "first-and-middle":
            config["softmax_layers"] = sorted({0, num_layers // 2})
        return config


METHOD_ENTRIES = (
    MethodEntry("liger-gla", "Liger-GLA (pure recurrence, window 0)",
                {"method": "liger-gla", "window": 0}, "smollm2-cpu-liger.yaml"),
    MethodEntry("liger-attention", "Liger Attention (window 64 + GLA, 0.5/0.5)",
                {"method": "liger-gla"}, "smollm2-cpu-liger.yaml"),
    MethodEntry("liger-hgrn2", "Liger-HGRN2 (window 64)",
                {"method": "liger-hgrn2"}, "smollm2-cpu-liger.yaml"),
    MethodEntry("lizard", "Lizard (window 128, meta-memory, two stages)",
                {"method": "lizard"}, "smollm2-cpu-lizard.yaml"),
    MethodEntry("lolcats", "LoLCATs (window 64, shared denominator, two stages)",
                {"method": "lolcats"}, "smollm2-cpu-lizard.yaml"),
    MethodEntry("lizard-hybrid", "Lizard + softmax attention kept in the first and middle layers (inter-layer hybrid)",
                {"method": "lizard", "softmax_layers": "first-and-middle"}, "smollm2-cpu-lizard.yaml"),
    MethodEntry("window-sinks", "window + sinks (4 + 64), no training: the baseline",
                {"method": "window-sinks"}, None),
)
ENTRY_BY_NAME = {e.name: e for e in METHOD_ENTRIES}


@dataclass
class ResultsSettings:
    """Everything the document depends on (saved as work_dir/settings.json)."""

    model: str | None = None
    work_dir: str = "outputs/results"
    doc: str = "docs/results.md"
    methods: list[str] = field(default_factory=lambda: [e.name for e in METHOD_ENTRIES])
    stage1_tokens: int = 16384
    stage2_tokens: int = 32768
    seq_len: int = 512
    gradient_accumulation_steps: int = 4
    ppl_texts: int = 64
    long_texts: int = 48
    long_length: int = 1024
    mmlu_limit: int | None = 1
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 1024])
    speed_length: int = 4096
    speed_repeats: int = 1
    decode_steps: int = 16
    prefill_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 32768])
    train_lengths: list[int] = field(default_factory=lambda: [512, 2048])
    kernel_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    bench_repeats: int = 3
    threads: int | None = None
    extra_runs: list[str] = field(default_factory=list)
    redo: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    progress: bool = True

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in ENTRY_BY_NAME]
        if unknown:
            raise ValueError(f"unknown method entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"choose from {', '.join(ENTRY_BY_NAME)}")
        for option in ("redo", "skip"):
            bad = [s for s in getattr(self, option) if s not in STEPS]
            if bad:
                raise ValueError(f"unknown step(s) {', '.join(bad)} in {option}; steps are {', '.join(STEPS)}")
        for run in self.extra_runs:
            if not (Path(run) / "final" / "config.json").is_file():
                raise ValueError(f"extra run {run} has no final/config.json: pass the output_dir of a finished "
                                 "`linearize distill` run")
        if "train" in self.skip:
            raise ValueError("train cannot be skipped: every later step reads the trained checkpoint")
        for name in ("stage1_tokens", "stage2_tokens", "seq_len", "gradient_accumulation_steps", "ppl_texts",
                     "long_texts", "long_length", "speed_length", "speed_repeats", "decode_steps", "bench_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
