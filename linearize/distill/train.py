"""Two-stage recovery of a linearized model under `accelerate` (single process, DDP, FSDP).

Stage 1, attention transfer: every mixer runs its student and the original softmax
attention on the same input, the per-layer MSE (summed or averaged over layers) trains only
the mixers' new parameters, and each layer passes the teacher's output on (layers train
independently); each layer's MSE is logged too.
Stage 2, LoRA: peft adapters on the linearized model; loss = next-token cross-entropy,
optionally mixed with KL to the teacher's logits, the teacher being the same weights with
the adapters disabled and softmax attention switched back on.
Optionally, held-out perplexity is measured at step 0 and every N tokens of either stage.

Each stage builds its model from the recipe and the latest checkpoint, so a fresh stage and a
resumed one take the same path, and the final export is rebuilt from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..assets import MissingAssetError, default_model_dir
from ..model_folder import CheckpointError, check_finite, load
from ..convert import convert, is_linearized, mixers, new_parameters, teacher
from ..mixers import AttentionTransfer
from ..model_card import write_model_card
from ..peft_quiet import peft_quietly
from ..sparse_cache import set_sparse_cache
from ..state import is_new_parameter
from .checkpointing import (CheckpointMissingError, TrainerState, all_finite, checkpoint_name, clean_partial,
                            fsync_tree, last_good_checkpoint, latest_checkpoint, point_latest, read_checkpoint,
                            save_checkpoint, usable_checkpoint, write_atomic)
from .data import IGNORE_INDEX, build_rows, check_source, records
from .lock import OutputLock, OutputLockedError
from .metrics import (HeldoutPerplexity, MetricsLog, check_eval_source, evaluating, layer_mse_summary,
                      plot_losses)
from .recipe import OptimizerSection, Recipe, RecipeError, flatten_sections, flatten_with_defaults, load_recipe
from .sharding import (ShardingError, check_mode, is_fsdp, keep_new_parameters_fp32, load_state, save_state,
                       trainable_state)
from .tracking import Trackers, accelerator_kwargs
from .window_dropout import draw_dropped_layers, set_train_windows

LORA_MARK = "lora_"
PEFT_PREFIX = "base_model.model."
# recipe keys (and sections) a resumed run may change: the optimizer, the budget, eval, logging
# and checkpointing; any other change would alter the model, the loss or the data order
RESUME_MUTABLE = ("resume", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "save_adapter", "output_dir",
                  "eval", "guard", "stage1.optimizer", "stage2.optimizer", "stage1.max_tokens", "stage1.max_steps",
                  "stage2.max_tokens", "stage2.max_steps", "log_with", "tracker_project")
# where a merged final keeps its LoRA delta (a peft adapter), so the original weights can be had
LORA_DELTA_DIR = "lora-delta"


class DistillError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclass
class StagePlan:
    """stage: 1 or 2; steps: optimizer steps; seq_len: its rows' length; row_offset: global
    sample position of step 0 in the stage's rows; tokens_before: the earlier stages' tokens."""

    stage: int
    steps: int
    seq_len: int
    row_offset: int
    tokens_before: int


# -- model ---------------------------------------------------------------------------------
def resolve_model_path(recipe: Recipe) -> str:
    """The recipe's model folder or hub id, or the embedded default's folder."""
    if recipe.model.path is not None:
        p = Path(recipe.model.path).expanduser()
        return str(p) if p.exists() else recipe.model.path
    try:
        return str(default_model_dir())
    except MissingAssetError as e:
        raise DistillError(f"model.path is null (the embedded SmolLM2) but {e}; or set model.path") from e


def check_model_path(recipe: Recipe) -> None:
    """RecipeError for a model.path that names a local folder which is missing or has no config.json."""
    if recipe.model.path is None:
        return
    p = Path(recipe.model.path).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise RecipeError(f"model.path {p} has no config.json: point it at a Hugging Face model folder")
    if not p.exists() and recipe.model.path.startswith((".", "/", "~")):
        raise RecipeError(f"model.path {p} does not exist: point it at a local Hugging Face folder, give a hub "
                          "id (org/name), or null for the embedded default")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """DistillError unless output_dir (or the folder it will be created in) accepts new files."""
    where = _existing_ancestor(out)
    if not where.is_dir():
        raise DistillError(f"output_dir {out}: {where} is a file, not a folder; set output_dir to a folder path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".linearize-write-probe-", dir=where))
    except OSError as e:
        raise DistillError(f"output_dir {out} is not writable: {where} refuses new files ({e.strerror}); set "
                           "output_dir to a folder you can write") from e


def final_size_estimate(path: str, dtype: str) -> int | None:
    """Bytes the exported `final` takes (parameters in `dtype` x 1.1), from the config alone; None if unknown."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            shapes = AutoModelForCausalLM.from_config(config)
    except Exception:  # the model load that follows reports a bad folder with its own message
        return None
    return int(1.1 * getattr(torch, dtype).itemsize * sum(p.numel() for p in shapes.parameters()))


def check_free_space(out: Path, need_bytes: int | None) -> None:
    """DistillError when the disk of output_dir has less free space than the final model needs."""
    if need_bytes is None:
        return
    where = _existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise DistillError(f"not enough free space for output_dir {out}: the final model needs about "
                           f"{need_bytes / 2**20:,.0f} MiB (parameters x 1.1) and {where} has {free / 2**20:,.0f} "
                           "MiB free; free some space or set output_dir on another disk")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DistillError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}. "
                           "The model folder needs its tokenizer files (tokenizer.json, ...)") from e
    return tok


def source_sparse_cache(path: str) -> tuple[int, int] | None:
    """(sparse_cache, sparse_block) of an already linearized source folder that sets the sparse
    cache, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    spec = json.loads(config.read_text()).get("linearize") or {}
    return (spec["sparse_cache"], spec.get("sparse_block", 64)) if spec.get("sparse_cache") else None


def check_source_finite(model, path: str) -> None:
    """DistillError naming the tensors of the loaded source model that hold NaN or inf."""
    try:
        check_finite(model, Path(path), opt_out="model.allow_nonfinite=true in the recipe")
    except CheckpointError as e:
        raise DistillError(str(e)) from e


def build_model(recipe: Recipe, path: str):
    """Load the model and linearize it (unless the folder already is), ready for training.

    Returns a `Linearized<Base>ForCausalLM` with `use_cache` off.
    """
    try:
        model = load(path, dtype=getattr(torch, recipe.model.dtype), allow_nonfinite=True)
    except (CheckpointError, OSError, ValueError) as e:
        raise DistillError(f"could not load the model {path}: {type(e).__name__}: {e}. Without hub access, "
                           "set model.path to a local Hugging Face folder (or null for the embedded default)") from e
    if not recipe.model.allow_nonfinite:
        check_source_finite(model, path)
    already = is_linearized(model)
    if already and recipe.linearize is not None:
        raise RecipeError(f"{path} is already linearized ({model.config.linearize.get('method')}): set linearize: null "
                          "in the recipe to train it as it is")
    if not already:
        if recipe.linearize is None:
            raise RecipeError(f"{path} is not linearized: give a linearize config (e.g. linearize: {{method: lizard}})")
        convert(model, recipe.linearize)
    if already and model.config.linearize.get("sparse_cache"):
        set_sparse_cache(model, 0)  # inference-only (no gradient); `final` gets it back (write_final)
    model.config.use_cache = False
    softmax_layers = model.config.linearize.get("softmax_layers") or []
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(recipe.seq_len, recipe.stage1.seq_len or 0)
    if softmax_layers and max_pos is not None and longest > max_pos:
        raise RecipeError(f"seq_len {longest} is above the model's max_position_embeddings {max_pos} while "
                          f"layers {softmax_layers} keep softmax attention: lower seq_len to <= {max_pos} or "
                          "linearize every layer (linearize.softmax_layers: [])")
    return model


def apply_lora(model, recipe: Recipe):
    """Wrap `model` in peft LoRA adapters as `stage2.lora` says; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = recipe.stage2.lora
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        with peft_quietly():
            peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise RecipeError(f"stage2.lora.target_modules {lora.target_modules}: {e}. Use module names of the model "
                          "such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj") from e
    if recipe.stage2.train_new_parameters:
        for name, p in peft_model.named_parameters():
            if is_new_parameter(name):
                p.requires_grad_(True)
    return peft_model


def set_gradient_checkpointing(model, on: bool) -> None:
    """Turn transformers' per-decoder-layer gradient checkpointing on or off for `model` (a
    PeftModel or the model itself). Non-reentrant, so frozen embeddings need no gradient hook
    and LoRA, the mixers' new parameters and window dropout's choices replay exactly."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.25 names it so
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def check_lora_targets(model, recipe: Recipe) -> None:
    """RecipeError naming the stage2.lora.target_modules that no module name of `model` ends
    with, as peft matches them (checked when the model is built, not after stage 1 has trained)."""
    if not recipe.stage2.enabled:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in recipe.stage2.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RecipeError(f"stage2.lora.target_modules {missing}: the model has no such module; use names of its "
                          f"linear layers: {', '.join(linear)}")


def canonical(name: str) -> str:
    """A parameter name without peft's wrapper prefix (the same name before and after LoRA)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def kept_parameter(name: str) -> bool:
    """Parameters a checkpoint keeps: the mixers' new ones and LoRA's."""
    return is_new_parameter(name) or LORA_MARK in name


def load_params(model, params: dict[str, torch.Tensor]) -> None:
    """Copy saved parameters (canonical names) into `model` in place; all must match."""
    own = {canonical(n): p for n, p in model.named_parameters()}
    missing = [k for k in params if k not in own]
    if missing:
        raise DistillError(f"the checkpoint holds parameters this model lacks ({', '.join(missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}): the recipe's model or linearize config changed")
    with torch.no_grad():
        for k, v in params.items():
            if own[k].shape != v.shape:
                raise DistillError(f"checkpoint parameter {k} has shape {tuple(v.shape)}, the model "
                                   f"{tuple(own[k].shape)}: the recipe's model or linearize config changed")
            own[k].copy_(v.to(own[k].dtype))


def collect_params(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The kept parameters with canonical names, on the main process (None elsewhere).

    Under FSDP only the trainable parameters are gathered (collective: every process calls it).
    """
    if is_fsdp(accelerator):
        state = trainable_state(accelerator, model)
    else:
        state = dict(accelerator.unwrap_model(model).named_parameters()) if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return {canonical(k): v.detach().cpu().clone() for k, v in state.items() if kept_parameter(k)}


# -- losses --------------------------------------------------------------------------------
def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def transfer_loss(model, batch, transfer: AttentionTransfer, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 for one micro-batch: (loss, per-layer MSE).

    loss: a scalar, the sum (reduction="sum") or mean ("mean") over linearized layers of
    MSE(student, teacher); per-layer MSE: [L] detached, in layer order.
    """
    per_layer = layer_losses(model, batch, transfer)
    loss = per_layer.mean() if reduction == "mean" else per_layer.sum()
    return loss, per_layer.detach().float()


def layer_losses(model, batch, transfer: AttentionTransfer) -> torch.Tensor:
    """The linearized layers' MSE(student, teacher) for one forward over `batch`: [L], in layer order."""
    transfer.losses.clear()
    model(**forward_inputs(batch), use_cache=False, logits_to_keep=1)
    if not transfer.losses:
        raise DistillError("no attention-transfer loss was recorded: the model has no linearized layer")
    per_layer = torch.stack(transfer.losses)
    transfer.losses.clear()
    return per_layer


def heldout_layer_mse(model, tokenizer, texts: list[str], window: int, transfer) -> dict[int, float]:
    """Stage 1's attention-transfer MSE of each linearized layer on held-out text: {layer index:
    MSE}, the mean over the texts' first `window` tokens, weighted by their token counts.

    `transfer` is the AttentionTransfer the model's mixers hold in stage 1: each layer's MSE is
    taken on the teacher's input, as in training, so the values compare with the `layer_mse`
    of the training records, but on the same text at every step. Eval mode, no gradients; the
    model's train/eval mode is restored.
    """
    layers = [m.layer_idx for m in mixers(model)]
    device = next(model.parameters()).device
    total, count = torch.zeros(len(layers), dtype=torch.float64), 0
    with evaluating(model):
        for text in texts:
            ids = tokenizer(text, return_tensors=None)["input_ids"][:window]
            if len(ids) < 2:
                continue
            per_layer = layer_losses(model, {"input_ids": torch.tensor([ids], device=device)}, transfer)
            total += per_layer.double().cpu() * len(ids)
            count += len(ids)
    if count == 0:
        raise RecipeError("no held-out text has two tokens to measure stage 1's layer MSE on: check eval.source")
    return {i: float(v) for i, v in zip(layers, total / count)}


def recovery_loss(model, peft_model, batch, kd_ratio: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2 summed over the micro-batch's predicted tokens: (total, ce, kl), each a scalar.

    total = (1 - kd_ratio) * CE + kd_ratio * T^2 * KL(teacher || student), where logits
    [B, T, V] at position t predict labels[:, t + 1].
    """
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    teacher_logits = None
    if kd_ratio > 0:
        with torch.no_grad(), teacher(peft_model):
            teacher_logits = model(**forward_inputs(batch), use_cache=False).logits[:, :-1].float()
    logits = model(**forward_inputs(batch), use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    kl = logits.new_zeros(())
    if teacher_logits is not None:
        t_logp = F.log_softmax(teacher_logits[valid] / temperature, dim=-1)
        s_logp = F.log_softmax(logits[valid] / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum() * temperature ** 2
    return (1 - kd_ratio) * ce + kd_ratio * kl, ce.detach(), kl.detach()


# -- the loop ------------------------------------------------------------------------------
class Run:
    """One distillation run: recipe, accelerator, data, log and checkpoints."""

    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator

        self.recipe = recipe
        self.accelerator = Accelerator(**accelerator_kwargs(recipe))
        acc = self.accelerator
        self.out = Path(recipe.output_dir)
        self.ckdir = self.out / "checkpoints"
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.global_batch = recipe.batch_size * recipe.gradient_accumulation_steps * self.world
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=acc.is_main_process)
        self.trackers = Trackers(acc, recipe)
        self.metrics.sinks.append(self.trackers.log)
        self.resume_changes: dict[str, tuple] = {}

    def say(self, msg: str) -> None:
        self.accelerator.print(f"[distill] {msg}", flush=True)

    def row_len(self, stage: int, recipe: Recipe | None = None) -> int:
        """The length of the stage's training rows (stage1.seq_len, else the recipe's seq_len)."""
        recipe = recipe or self.recipe
        return (recipe.stage1.seq_len if stage == 1 else None) or recipe.seq_len

    def step_tokens(self, stage: int, recipe: Recipe | None = None) -> int:
        """Training tokens in one optimizer step of the stage (all processes together)."""
        return self.global_batch * self.row_len(stage, recipe)

    def stage_steps(self, stage: int, recipe: Recipe | None = None) -> int:
        recipe = recipe or self.recipe
        s = recipe.stage1 if stage == 1 else recipe.stage2
        return s.max_steps if s.max_steps is not None else max(1, s.max_tokens // self.step_tokens(stage, recipe))

    def check_resume(self) -> Path | None:
        """The checkpoint to continue from (None: a fresh run), after checking what the recipe changed.

        An unreadable newest checkpoint falls back to the previous readable one, with a warning
        naming the bad file.
        """
        acc = self.accelerator
        if acc.is_main_process:
            clean_partial(self.ckdir)
        acc.wait_for_everyone()
        pointer = self.ckdir / "latest"
        if not self.recipe.resume:
            if pointer.is_file():
                raise DistillError(f"{self.out} already holds a run (checkpoints/latest -> "
                                   f"{pointer.read_text().strip()}): pass resume=true to continue it, or choose "
                                   "another output_dir")
            return None
        try:
            existing = usable_checkpoint(self.ckdir, lambda m: self.say(f"warning: {m}"), repoint=acc.is_main_process)
        except CheckpointMissingError as e:
            raise DistillError(str(e)) from e
        acc.wait_for_everyone()
        if existing is None:
            self.say(f"resume=true but {self.ckdir} has no checkpoint yet: starting from the beginning")
            return None
        state, _, _ = read_checkpoint(existing)
        saved = self.out / "recipe.yaml"
        self.resume_changes = self.recipe_changes(saved, state) if saved.is_file() else {}
        if state.global_batch != self.global_batch:
            raise DistillError(f"the checkpoint was written with a global batch of {state.global_batch} rows and "
                               f"this launch has {self.global_batch} (batch_size x gradient_accumulation_steps x "
                               f"{self.world} processes): resume with the same global batch to keep the data order")
        return existing

    def recipe_changes(self, saved: Path, done: TrainerState) -> dict[str, tuple]:
        """{key: (before, now)} of the recipe keys a resume changes; DistillError for a change
        that would alter the model, the loss or the data order (see RESUME_MUTABLE)."""
        before = flatten_with_defaults(yaml.safe_load(saved.read_text()) or {})
        now = flatten_sections(self.recipe.to_dict())
        changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k) and k != "resume"}
        fixed = [k for k in changed if not any(k == m or k.startswith(m + ".") for m in RESUME_MUTABLE)]
        if fixed:
            detail = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed[:6])
            raise DistillError(f"the recipe changed since this run started ({detail}): these keys alter the model, "
                               "the loss or the data order. Resume with the original values (see recipe.yaml in "
                               "output_dir) or start a new output_dir; a resume may change the optimizer, the "
                               "budgets (max_tokens, max_steps), eval, guard, logging and checkpointing")
        if done.stage == 2 and any(k.startswith("stage1.max_") for k in changed):
            old, new = self.stage_steps(1, load_recipe(saved)), self.stage_steps(1)
            if old != new:
                raise DistillError(f"stage 1 is done ({old} steps) and its budget sets where stage 2 reads the data: "
                                   "keep stage1.max_tokens / max_steps as they were when resuming in stage 2")
        return changed

    def run(self) -> Path:
        """Check everything that needs no model, then train each stage with steps left and
        export `final`; returns its folder."""
        from accelerate.utils import set_seed

        acc, recipe = self.accelerator, self.recipe
        resume_from = self.prepare()
        set_seed(recipe.seed)
        model = build_model(recipe, self.model_path)
        check_lora_targets(model, recipe)
        self.check_eval_length(model)
        plans = self.plan_stages(model)
        done = self.resume_point(resume_from)
        for plan in plans:
            # a resumed budget counts, not the checkpoint's: a raised max_steps continues a finished stage
            if done is not None and (done.stage > plan.stage or (done.stage == plan.stage and done.step >= plan.steps)):
                continue
            if model is None:
                set_seed(recipe.seed + plan.stage)
                model = build_model(recipe, self.model_path)
            resume_here = resume_from if (done is not None and done.stage == plan.stage) else None
            self.train_stage(plan, model, resume_here)
            model = None
            acc.free_memory()
        final = None
        if acc.is_main_process:
            final = self.export_final()
            plot_losses(self.metrics.records(), self.out / "loss.png")
            self.say(f"final model: {final} (load it with linearize.load); log: {self.metrics.path}; "
                     f"curve: {self.out / 'loss.png'}")
        acc.wait_for_everyone()
        return final if final is not None else self.out / "final"

    def prepare(self) -> Path | None:
        """The checks that need no model (output, model path, data, eval source, resume,
        accelerate mode, free space, tokenizer), then recipe.yaml and the trackers; returns the
        checkpoint to resume from, if any."""
        acc, recipe = self.accelerator, self.recipe
        check_writable(self.out)  # before anything loads: a read-only output costs a second
        check_model_path(recipe)
        check_source(recipe.data)
        if recipe.eval.every_tokens is not None:
            check_eval_source(recipe.eval)
        resume_from = self.check_resume()
        self.check_accelerate_mode(resume_from)
        with acc.main_process_first():  # the embedded model is built once, by the main process
            self.model_path = resolve_model_path(recipe)
        check_free_space(self.out, final_size_estimate(self.model_path, recipe.model.dtype))
        self.tokenizer = load_tokenizer(self.model_path)
        self.heldout = HeldoutPerplexity(recipe.eval, self.tokenizer, recipe.seq_len)
        if recipe.eval.every_tokens is not None:
            self.heldout.texts()  # a bad eval.source fails now, not after a stage of training
        with acc.main_process_first():  # a missing split or field fails now, before the model loads
            records(recipe.data, self.tokenizer)
        if acc.is_main_process:  # every check that needs no model passed: the run starts here
            with writing("recipe.yaml", self.out):
                self.out.mkdir(parents=True, exist_ok=True)
                write_atomic(self.out / "recipe.yaml", recipe.to_yaml())
        self.trackers.start()
        return resume_from

    def plan_stages(self, model) -> list[StagePlan]:
        """The stages with steps to run (stage 1 only when the method adds parameters), the
        training rows they read, and the line that says so."""
        acc, recipe = self.accelerator, self.recipe
        method = model.config.linearize["method"]
        has_new = bool(new_parameters(model))
        s1 = self.stage_steps(1) if recipe.stage1.enabled and has_new else 0
        if recipe.stage1.enabled and not has_new:
            self.say(f"stage 1 skipped: {method} has no new parameters to train (its feature maps and gates are "
                     "parameter-free); stage 2 (LoRA) does the recovery")
        s2 = self.stage_steps(2) if recipe.stage2.enabled else 0
        if s1 == 0 and s2 == 0:
            raise RecipeError(f"nothing to train: {method} has no new parameters for stage 1 and stage 2 is disabled; "
                              "set stage2.enabled=true")
        s1_tokens = s1 * self.step_tokens(1)
        # stage 2 reads the documents from where stage 1 stopped, whatever stage 1's row length
        s2_offset = -(-s1_tokens // recipe.seq_len)
        plans = [p for p in (StagePlan(1, s1, self.row_len(1), 0, 0),
                             StagePlan(2, s2, recipe.seq_len, s2_offset, s1_tokens)) if p.steps]
        self.trackers.offsets[2] = s1
        needed: dict[int, int] = {}  # rows needed per row length
        for p in plans:
            needed[p.seq_len] = max(needed.get(p.seq_len, 0), p.row_offset + p.steps * self.global_batch)
        with acc.main_process_first():  # datasets' cache is written once, then read by the others
            built = {n: build_rows(recipe.data, self.tokenizer, n, recipe.batch_size, rows, recipe.seed)
                     for n, rows in needed.items()}
        self.rows = {p.stage: built[p.seq_len] for p in plans}
        sets = "; ".join(f"{len(rows)} rows of {n} tokens from {rows.num_documents} documents "
                         f"({needed[n] / len(rows):.2f} passes)" for n, rows in built.items())
        self.say(f"{self.model_path} -> {method}; {sets}; global batch {self.global_batch} rows on {self.world} "
                 "process(es); " + ", ".join(f"stage {p.stage}: {p.steps} steps of {self.step_tokens(p.stage)} tokens "
                                            f"({p.steps * self.step_tokens(p.stage):,} tokens)" for p in plans))
        return plans

    def resume_point(self, resume_from: Path | None) -> TrainerState | None:
        """The state of the checkpoint to resume from (metrics.jsonl cut back to it and the
        changed settings logged), or None for a fresh start (metrics.jsonl emptied)."""
        if resume_from is None:
            self.metrics.reset()
            return None
        done, _, _ = read_checkpoint(resume_from)
        self.metrics.truncate_after(done.stage, done.step)
        self.say(f"resuming from {resume_from.name} (stage {done.stage}, step {done.step}/{done.stage_steps})")
        if self.resume_changes:
            self.say("resumed with changed settings: " + "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.resume_changes.items()))
            self.metrics.log({"stage": done.stage, "step": done.step,
                              "resume_changes": {k: list(v) for k, v in self.resume_changes.items()}})
        return done

    def check_accelerate_mode(self, resume_from: Path | None) -> None:
        """DistillError, before the model loads, for an accelerate mode or FSDP setting distill
        cannot train or checkpoint right (see `sharding.check_mode`); stage 1 counts when it
        still has steps to run."""
        stage1 = self.recipe.stage1.enabled
        if stage1 and resume_from is not None:
            done, _, _ = read_checkpoint(resume_from)
            stage1 = done.stage == 1 and done.step < self.stage_steps(1)
        try:
            check_mode(self.accelerator, self.recipe.model.dtype, stage1)
        except ShardingError as e:
            raise DistillError(str(e)) from e

    def check_eval_length(self, model) -> None:
        """Softmax layers cannot score a perplexity window past the model's positions."""
        if self.recipe.eval.every_tokens is None:
            return
        softmax_layers = model.config.linearize.get("softmax_layers") or []
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if softmax_layers and max_pos is not None and self.heldout.window > max_pos:
            raise RecipeError(f"eval.seq_len {self.heldout.window} is above the model's max_position_embeddings "
                              f"{max_pos} while layers {softmax_layers} keep softmax attention: lower eval.seq_len")

    def train_stage(self, plan: StagePlan, model, resume_from: Path | None) -> None:
        acc, recipe = self.accelerator, self.recipe
        from transformers import get_scheduler

        keep_new_parameters_fp32(model)
        start_state = None
        latest = latest_checkpoint(self.ckdir)
        if latest is not None:
            start_state, scheduler_state, params = read_checkpoint(latest)
            load_params(model, {k: v for k, v in params.items() if LORA_MARK not in k})
        peft_model = None
        if plan.stage == 1:
            for p in model.parameters():
                p.requires_grad_(False)
            for _, p in new_parameters(model):
                p.requires_grad_(True)
            section = recipe.stage1
        else:
            from accelerate.utils import set_seed

            set_seed(recipe.seed + 2)
            model = peft_model = apply_lora(model, recipe)
            if latest is not None and start_state.stage == 2:
                load_params(model, {k: v for k, v in params.items() if LORA_MARK in k})
            section = recipe.stage2
            set_gradient_checkpointing(model, section.gradient_checkpointing)
        opt_cfg = section.optimizer
        optimizer = build_optimizer(model, section)
        scheduler = get_scheduler(opt_cfg.scheduler, optimizer, num_warmup_steps=int(opt_cfg.warmup_ratio * plan.steps),
                                  num_training_steps=plan.steps)
        base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        self.say(f"stage {plan.stage}: training {trained:,} parameters ({frozen:,} frozen)")
        model, optimizer = acc.prepare(model, optimizer)
        step, tokens, elapsed0 = 0, 0, 0.0
        if resume_from is not None:
            load_state(acc, model, optimizer, resume_from)
            state, scheduler_state, _ = read_checkpoint(resume_from)
            scheduler.load_state_dict(scheduler_state)
            apply_optimizer_settings(optimizer, scheduler, opt_cfg, base_lrs)
            step, tokens, elapsed0 = state.step, state.tokens, state.elapsed_s
        transfer = None
        if plan.stage == 1:
            transfer = AttentionTransfer()
            for m in mixers(acc.unwrap_model(model)):
                m.transfer = transfer
        check_window_dropout(section, mixers(acc.unwrap_model(model)), plan.stage)
        try:
            self.loop(plan, model, peft_model, optimizer, scheduler, transfer, step, tokens, elapsed0)
        finally:
            set_gradient_checkpointing(acc.unwrap_model(model), False)
            layers = mixers(acc.unwrap_model(model))
            set_train_windows(layers, torch.zeros(len(layers), dtype=torch.bool), None)
            if transfer is not None:
                for m in layers:
                    m.transfer = None

    def loop(self, plan, model, peft_model, optimizer, scheduler, transfer, step, tokens, elapsed0) -> None:
        """Train `plan` from `step` to its last step: accumulate, guard and step, log, evaluate
        and checkpoint as the recipe says."""
        acc, recipe = self.accelerator, self.recipe
        bar = tqdm(total=plan.steps, initial=step, desc=f"stage {plan.stage}", unit="step", dynamic_ncols=True,
                   disable=not (recipe.progress and acc.is_main_process))
        t0 = time.perf_counter()
        start_step, start_tokens, eval_s = step, tokens, 0.0
        layers = [m.layer_idx for m in mixers(acc.unwrap_model(model))] if plan.stage == 1 else []
        interval, interval_steps = torch.zeros(len(layers)), 0  # per-layer MSE since the last record
        self.last_ppl = None
        history = self.loss_history(plan.stage, step)
        model.train()
        if step == 0 and self.heldout.enabled(plan.stage):
            eval_s += self.evaluate(plan, model, step, tokens, bar, transfer)
        while step < plan.steps:
            dropped = self.drop_windows(plan, model, step)
            total = self.accumulate(plan, model, peft_model, transfer, step, len(layers))
            loss_value = float(total[0])
            grad_norm, lr = self.optimizer_step(plan, step, model, optimizer, scheduler, loss_value, history, bar)
            step += 1
            tokens += self.step_tokens(plan.stage)
            elapsed = time.perf_counter() - t0
            tok_s = (tokens - start_tokens) / max(elapsed - eval_s, 1e-9)
            bar.update(1)
            postfix = {"loss": f"{loss_value:.4g}", "tok_s": f"{tok_s:,.0f}"}
            bar.set_postfix(postfix | ({"ppl": f"{self.last_ppl:.4g}"} if self.last_ppl is not None else {}),
                            refresh=False)
            record = {"stage": plan.stage, "step": step, "loss": loss_value, "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tok_s,
                      "elapsed_s": elapsed0 + elapsed}
            if plan.stage == 2:
                record.update(ce=float(total[1]), kl=float(total[2]))
            if dropped is not None:
                record["window_dropped_layers"] = dropped
            interval += total[3:].cpu()
            interval_steps += 1
            if step % recipe.log_every == 0 or step == plan.steps:
                if layers:
                    record["layer_mse"] = {str(i): float(v) for i, v in zip(layers, interval / interval_steps)}
                    interval, interval_steps = torch.zeros(len(layers)), 0
                self.metrics.log(record)
            if self.heldout.due(plan.stage, tokens - self.step_tokens(plan.stage), tokens, step == plan.steps):
                eval_s += self.evaluate(plan, model, step, tokens, bar, transfer)
            if step == plan.steps or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0):
                state = TrainerState(plan.stage, step, plan.steps, self.global_batch, tokens,
                                     elapsed0 + time.perf_counter() - t0, loss=loss_value)
                self.checkpoint(state, model, optimizer, scheduler)
        bar.close()
        if step > start_step:
            self.say(f"stage {plan.stage} done: {step} steps, {tokens:,} tokens, last loss {loss_value:.4g}")
            summary = layer_mse_summary(self.metrics.records()) if plan.stage == 1 and acc.is_main_process else None
            if summary:
                self.say(summary)

    def optimizer_step(self, plan, step: int, model, optimizer, scheduler, loss_value: float, history: list[float],
                       bar) -> tuple[float | None, float]:
        """Clip (or only measure) the gradient norm, stop the run on an unhealthy step (`unhealthy`),
        else step the optimizer and the schedule; returns (gradient norm or None, the step's lr)."""
        opt_cfg = (self.recipe.stage1 if plan.stage == 1 else self.recipe.stage2).optimizer
        guard = self.recipe.guard
        grad_norm = None
        if opt_cfg.max_grad_norm is not None or guard.max_grad_norm is not None:
            clip = opt_cfg.max_grad_norm if opt_cfg.max_grad_norm is not None else math.inf  # inf: measure only
            grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), clip))
        why = unhealthy(guard, loss_value, grad_norm, history)
        if why is not None:
            bar.close()
            self.stop(plan, step, why)
        history.append(loss_value)
        del history[:-guard.window]
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def checkpoint(self, state: TrainerState, model, optimizer, scheduler) -> None:
        """Save a resumable checkpoint at `state` (marked finite or not from the parameters it
        holds) and redraw loss.png."""
        acc = self.accelerator
        params = collect_params(acc, model)
        state.finite = params is None or all_finite(params)
        with writing(f"checkpoint {checkpoint_name(state.stage, state.step)}", self.ckdir):
            save_checkpoint(acc, self.ckdir, state, params, scheduler.state_dict(), self.recipe.keep_checkpoints,
                            write_state=lambda folder: save_state(acc, model, optimizer, folder))
        if acc.is_main_process:
            plot_losses(self.metrics.records(), self.out / "loss.png")

    def drop_windows(self, plan, model, step: int) -> int | None:
        """Window dropout for this step: cut the drawn layers' windows (see
        distill.window_dropout). Returns how many layers were cut, None when it is off."""
        section = (self.recipe.stage1 if plan.stage == 1 else self.recipe.stage2).window_dropout
        if not (section.rate or section.final_rate):
            return None
        layers = mixers(self.accelerator.unwrap_model(model))
        dropped = draw_dropped_layers(section, step, plan.steps, len(layers), self.recipe.seed, plan.stage)
        set_train_windows(layers, dropped, section.window)
        return int(dropped.sum())

    def accumulate(self, plan, model, peft_model, transfer, step: int, n_layers: int) -> torch.Tensor:
        """Forward and backward over one global step's micro-batches, gradients left in place.

        Returns [loss, ce, kl, MSE of each of the n_layers linearized layers] summed over
        processes: per row for stage 1, per predicted token for stage 2 (ce, kl: stage 2 only).
        """
        acc, recipe = self.accelerator, self.recipe
        B, accum, s2 = recipe.batch_size, recipe.gradient_accumulation_steps, recipe.stage2
        data = self.rows[plan.stage]
        rows = data.order(plan.row_offset + step * self.global_batch, self.global_batch, recipe.seed)
        n_pred = data.label_count(rows) if plan.stage == 2 else 0
        if plan.stage == 2 and n_pred == 0:
            raise DistillError(f"stage 2 step {step + 1}: the batch has no token to predict (all labels masked); "
                               "check data.format or raise seq_len")
        total = torch.zeros(3 + n_layers, device=acc.device)
        for i in range(accum):
            lo = (i * self.world + self.rank) * B
            batch = {k: v.to(acc.device) for k, v in data.batch(rows[lo:lo + B]).items()}
            sync = contextlib.nullcontext() if i == accum - 1 else acc.no_sync(model)
            with sync:
                if plan.stage == 1:
                    loss, per_layer = transfer_loss(model, batch, transfer, recipe.stage1.loss_reduction)
                    if per_layer.numel() != n_layers:
                        raise DistillError(f"stage 1 recorded {per_layer.numel()} layer losses for {n_layers} "
                                           "linearized layers: every mixer must record exactly one per forward")
                    acc.backward(loss / accum)
                    total[0] += loss.detach() / (accum * self.world)
                    total[3:] += per_layer.to(total.device) / (accum * self.world)
                else:
                    loss, ce, kl = recovery_loss(model, peft_model, batch, s2.kd_ratio, s2.temperature)
                    acc.backward(loss * (self.world / n_pred))
                    total[:3] += torch.stack([loss.detach(), ce, kl]) / n_pred
        return acc.reduce(total, reduction="sum")

    def loss_history(self, stage: int, step: int) -> list[float]:
        """The stage's logged losses up to `step` (the guard's running median on a resumed stage)."""
        return [r["loss"] for r in self.metrics.records()
                if r.get("stage") == stage and "loss" in r and r["step"] <= step][-self.recipe.guard.window:]

    def stop(self, plan: StagePlan, step: int, why: str) -> None:
        """Raise before the update that a NaN/inf or diverging loss would poison; no `final` is exported.

        `latest` is pointed at the last good checkpoint: the newest one before the weights that
        gave this loss (those of step `step`) whose parameters are finite, so resume=true
        continues from it; with none, `latest` is removed and a rerun starts from the beginning.
        """
        good = last_good_checkpoint(self.ckdir, (plan.stage, step))
        if self.accelerator.is_main_process and latest_checkpoint_name(self.ckdir) is not None:
            point_latest(self.ckdir, good)
        keep = (f"the last good checkpoint is {good} (resume=true continues from it)" if good is not None
                else "no healthy checkpoint was written before it (a rerun starts from the beginning)")
        raise DistillError(f"stage {plan.stage} step {step + 1}: {why}. Stopped before updating the weights; "
                           f"{keep}; final was not exported. Lower stage{plan.stage}.optimizer.lr (resume=true "
                           "accepts the change), set max_grad_norm, or use model.dtype=float32")

    def evaluate(self, plan: StagePlan, model, step: int, tokens: int, bar, transfer=None) -> float:
        """Log the student's held-out perplexity now, and in stage 1 (`transfer` given) each
        layer's attention-transfer MSE on the same texts; returns the seconds it took.

        Every process runs the same texts and the main process logs: under FSDP the forward is
        collective (each process gathers its shards), so the main process cannot run it alone,
        and the same rows everywhere need no reduction.
        """
        t = time.perf_counter()
        with detached_transfer(self.accelerator.unwrap_model(model)):
            result = self.heldout(model)
        record = {"stage": plan.stage, "step": step, "tokens": tokens, "run_tokens": plan.tokens_before + tokens,
                  "eval_ppl": result["perplexity"], "eval_nll": result["mean_nll"], "eval_tokens": result["tokens"]}
        msg = (f"[distill] stage {plan.stage} step {step} ({tokens:,} tokens): held-out perplexity "
               f"{result['perplexity']:.4g} over {result['tokens']:,} tokens")
        if transfer is not None:
            layer_mse = heldout_layer_mse(model, self.tokenizer, self.heldout.texts(), self.heldout.window, transfer)
            record["eval_layer_mse"] = {str(i): v for i, v in layer_mse.items()}
            msg += f", layer MSE mean {sum(layer_mse.values()) / len(layer_mse):.4g}"
        seconds = time.perf_counter() - t
        self.last_ppl = result["perplexity"]
        self.metrics.log(record | {"eval_s": seconds})
        msg += f" ({seconds:.1f} s)"
        if bar.disable:
            self.accelerator.print(msg, flush=True)
        else:
            bar.write(msg)
        return seconds

    def export_final(self) -> Path:
        """Rebuild the model from the last checkpoint and save `output_dir/final` (main process).

        LoRA is merged (merge_and_unload) unless `save_adapter`, which keeps it as a peft
        adapter in `final/adapter` (`linearize.load(final, adapter=final / "adapter")`).
        """
        recipe = self.recipe
        latest = latest_checkpoint(self.ckdir)
        _, _, params = read_checkpoint(latest)
        model = build_model(recipe, self.model_path)
        load_params(model, {k: v for k, v in params.items() if LORA_MARK not in k})
        final, tmp = self.out / "final", self.out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("the final model", self.out):
            try:
                self.write_final(model, params, tmp)
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        return final

    def training_sentence(self) -> str:
        """How this run trained, for the model card."""
        r = self.recipe
        stages = []
        for n, st in ((1, r.stage1), (2, r.stage2)):
            if st.enabled:
                amount = f"{st.max_steps} steps" if st.max_steps else f"{st.max_tokens:,} tokens"
                rows = f" at {self.row_len(1)}-token rows" if n == 1 and self.row_len(1) != r.seq_len else ""
                stages.append(f"stage {n} {amount}{rows}")
        lora = r.stage2.lora
        data = r.data.source or "the embedded default text"
        return (f"Distilled by `linearize distill` from `{self.model_path}` on `{data}` at {r.seq_len}-token "
                f"rows: {', '.join(stages)} (stage 1: attention transfer; stage 2: LoRA r={lora.r} on "
                f"{', '.join(lora.target_modules)}). The run's recipe.yaml holds every setting.")

    def write_final(self, model, params: dict[str, torch.Tensor], tmp: Path) -> None:
        """Save the model with the checkpoint's LoRA into `tmp`, recording how to get the teacher back.

        config.json gets `linearize_base_model` (the model the run started from). A merged LoRA
        is also saved as a peft adapter in `tmp/lora-delta` and named by `linearize_merged_lora`,
        so the original q/k/v weights (merged minus delta) stay recoverable for the teacher.
        """
        lora = {k: v for k, v in params.items() if LORA_MARK in k}
        if lora:
            peft_model = apply_lora(model, self.recipe)
            load_params(peft_model, lora)
            if self.recipe.save_adapter:
                # The adapter's base is the converted model saved beside it, not the softmax source:
                # AutoPeftModelForCausalLM and PeftModel.from_pretrained then build the student.
                peft_model.peft_config["default"].base_model_name_or_path = str((self.out / "final").resolve())
                peft_model.save_pretrained(str(tmp / "adapter"))
                model = peft_model.unload()
            else:
                peft_model.save_pretrained(str(tmp / LORA_DELTA_DIR))
                model = peft_model.merge_and_unload()
                model.config.linearize_merged_lora = LORA_DELTA_DIR
        base = Path(self.model_path)
        model.config.linearize_base_model = str(base.resolve()) if base.exists() else self.model_path
        model.config.use_cache = True
        source = source_sparse_cache(self.model_path)
        if source is not None:
            set_sparse_cache(model, *source)
        model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        write_model_card(model, tmp, name=f"{self.out.name}/final", base=self.model_path,
                         training=self.training_sentence())
        fsync_tree(tmp)


@contextlib.contextmanager
def detached_transfer(model):
    """The mixers without their stage-1 hook, so a forward computes the student's own output
    instead of passing the teacher's on."""
    ms = list(mixers(model))
    saved = [m.transfer for m in ms]
    for m in ms:
        m.transfer = None
    try:
        yield
    finally:
        for m, t in zip(ms, saved):
            m.transfer = t


def check_window_dropout(section, layers, stage: int) -> None:
    """A linearized source (model.path) is only known here: its layers need a window longer
    than the dropped one, beside a linear branch."""
    wd = section.window_dropout
    if not (wd.rate or wd.final_rate):
        return
    short = [m.layer_idx for m in layers if not (m.has_window and m.has_linear) or m.lconfig.window <= wd.window]
    if short:
        raise RecipeError(f"stage{stage}.window_dropout.window={wd.window} cannot shorten layers {short}: they have no "
                          f"window beside a linear branch, or one of at most {wd.window} tokens; lower the dropout "
                          f"window or set stage{stage}.window_dropout.rate=0 and final_rate=0")


def unhealthy(guard, loss: float, grad_norm: float | None, history: list[float]) -> str | None:
    """Why a step must not update the weights (NaN/inf, or divergence by `guard`), or None.

    history: the stage's recent losses, newest last (the running median's window).
    """
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    if guard.max_grad_norm is not None and grad_norm is not None and grad_norm > guard.max_grad_norm:
        return f"the gradient norm {grad_norm:.4g} is above guard.max_grad_norm {guard.max_grad_norm:g} (divergence)"
    if guard.loss_ratio is not None and len(history) >= guard.min_steps:
        median = statistics.median(history[-guard.window:])
        if median > 0 and loss > guard.loss_ratio * median:
            return (f"the loss {loss:.4g} is above guard.loss_ratio {guard.loss_ratio:g} x its running median "
                    f"{median:.4g} over the last {min(len(history), guard.window)} steps (divergence)")
    return None


def build_optimizer(model, section) -> torch.optim.AdamW:
    """AdamW over the parameters that train in this stage: one group at optimizer.lr, or, in
    stage 2 with new_parameters_lr set, the LoRA at optimizer.lr and the mixers' new parameters
    at new_parameters_lr (a second group)."""
    opt = section.optimizer
    new_lr = getattr(section, "new_parameters_lr", None)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trainable], "lr": opt.lr}]
    if new_lr is not None:
        new = [is_new_parameter(canonical(name)) for name, _ in trainable]
        groups = [{"params": [p for (_, p), n in zip(trainable, new) if not n], "lr": opt.lr},
                  {"params": [p for (_, p), n in zip(trainable, new) if n], "lr": new_lr}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


def apply_optimizer_settings(optimizer, scheduler, opt: OptimizerSection, base_lrs: list[float]) -> None:
    """Give a resumed optimizer and schedule the recipe's settings, not the checkpoint's.

    The checkpoint restores AdamW's moments and the schedule's position; the peak lr of each
    group (`base_lrs`, as `build_optimizer` set them), betas, eps and weight decay come from
    the recipe, the schedule (built for this recipe's warmup and budget) continues at the
    restored step.
    """
    for group, factor, lr in zip(optimizer.param_groups, scheduler.lr_lambdas, base_lrs):
        group.update(betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay, initial_lr=lr)
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler.base_lrs = list(base_lrs)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@contextlib.contextmanager
def writing(what: str, where: Path):
    """Turn a failed write (disk full, read-only folder, I/O error) into a DistillError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except DistillError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:
        raise DistillError(f"could not write {what} under {where}: {type(e).__name__}: {e}. Free some space or "
                           "make it writable; the previous checkpoint is intact and resume=true continues from "
                           "it") from e


def latest_checkpoint_name(ckdir: Path) -> str | None:
    pointer = ckdir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def distill(recipe: Recipe) -> Path:
    """Run the recipe's stages and return the final model folder (`output_dir/final`).

    Launch under `accelerate launch -m linearize.distill RECIPE` for DDP / FSDP; in a plain
    process it runs on one device. The main process holds `output_dir/distill.lock` while it
    runs, so a second run on the same folder is refused (see `lock`).
    """
    run = Run(recipe)
    check_writable(run.out)  # before the lock creates output_dir
    try:
        with OutputLock(run.out, run.say, enabled=run.accelerator.is_main_process):
            try:
                return run.run()
            finally:
                run.trackers.end()
    except OutputLockedError as e:
        raise DistillError(str(e)) from e
