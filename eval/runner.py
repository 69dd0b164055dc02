"""One evaluation run: lm-eval tasks and our own metrics on a student and its teacher.

The teacher is the same checkpoint under ``linearize.teacher`` with any LoRA adapter
disabled (the original model, same weights), so one loaded model serves both. A distilled
``final`` whose LoRA was merged into q/k/v records the delta (``linearize_merged_lora`` in
config.json): the run subtracts it and applies it as an adapter again, so the teacher gets the
original weights back; where they cannot be had the run says so and prints no teacher column. A run folder holds
``results.json`` (the schema below), ``results.md`` (the side-by-side table), the raw
lm-eval outputs and ``plots/*.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "linearize-eval/1"
METRICS = ("ppl", "agreement", "passkey", "mqar", "long-doc", "long-recall")
# The metric each paper table reports per task; everything else uses acc.
TASK_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm"}


@dataclass
class EvalSettings:
    """Everything a run depends on (saved in results.json)."""

    checkpoint: str
    tasks: list[str] = field(default_factory=lambda: ["mmlu_local"])
    adapter: str | None = None
    teacher: bool = False
    limit: float | None = None
    num_fewshot: int | None = None
    metrics: list[str] = field(default_factory=lambda: ["ppl", "agreement"])
    include_path: list[str] = field(default_factory=list)
    batch_size: int = 4
    device: str | None = None
    dtype: str = "auto"
    ppl_texts: int = 64
    max_length: int = 1024
    stride: int = 512
    agreement_length: int = 512
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 1
    mqar_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    mqar_samples: int = 16
    long_doc_tokens: int = 4096
    long_doc_buckets: list[int] = field(default_factory=lambda: [0, 64, 512, 2048, 4096])
    long_doc_documents: int | None = None
    long_lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    long_passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5])
    long_min_distance: int = 256
    long_mqar_pairs: list[int] = field(default_factory=lambda: [16])
    long_mqar_samples: int = 4
    seed: int = 0
    sparse_cache: int | None = None  # LoLA's sparse cache for a LoLCATs model (None: as saved)
    sparse_block: int | None = None
    sparse_per_kv_head: bool | None = None
    allow_nonfinite: bool = False  # load weights holding NaN or inf instead of refusing them
    progress: bool = True  # bars with ETA on our own metrics (drawn only when stderr is a terminal)


def check_tasks(tasks: list[str], tm) -> None:
    """Raise ``ValueError`` naming every task lm-eval does not know, with close matches."""
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, known, n=3)
            hints.append(f"{t}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            "unknown task(s): " + "; ".join(hints)
            + ". Local tasks: mmlu_local (and mmlu_local_<subject>); for piqa, arc_*, hellaswag "
            "and winogrande without hub access see eval/README.md (--include-path)."
        )


def check_task_data(tasks: list[str], tm) -> None:
    """Build each task (its documents included) before the model loads; ``ValueError`` naming a
    task whose data cannot be had (e.g. a hub data set without network)."""
    from lm_eval.tasks import get_task_dict

    for task in tasks:
        try:
            with quiet_lm_eval():
                get_task_dict([task], tm)
        except Exception as e:  # lm-eval and datasets raise many kinds here; all mean "no data"
            raise ValueError(f"task {task}: its documents cannot be loaded ({type(e).__name__}: {str(e)[:300]}). "
                             "Without hub access use a local copy (eval/README.md, --include-path) or another "
                             "task, e.g. mmlu_local") from e


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval's loggers at ERROR inside the block (task building warns once per subtask)."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "lm_eval.tasks", "lm_eval.api.task")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_settings(s: EvalSettings) -> None:
    """``ValueError`` naming the first out-of-range number (before anything loads)."""
    if s.limit is not None and not s.limit > 0:
        raise ValueError(f"--limit must be > 0 (documents per task, or a fraction below 1), got {s.limit:g}")
    if s.num_fewshot is not None and s.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {s.num_fewshot}")
    positive = {"--batch-size": s.batch_size, "--ppl-texts": s.ppl_texts, "--stride": s.stride,
                "--passkey-trials": s.passkey_trials, "--mqar-samples": s.mqar_samples,
                "--long-doc-tokens": s.long_doc_tokens, "--long-mqar-samples": s.long_mqar_samples}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--max-length": s.max_length, "--agreement-length": s.agreement_length}.items():
        if value < 2:
            raise ValueError(f"{flag} must be >= 2 tokens, got {value}")
    if s.stride > s.max_length:
        raise ValueError(f"--stride {s.stride} must not exceed --max-length {s.max_length}")


def check_tokenizer(checkpoint: str) -> None:
    """``ValueError`` when the checkpoint folder has no tokenizer that loads (before the model)."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(checkpoint)
    except Exception as e:  # a missing or broken tokenizer surfaces as OSError, ValueError, TypeError...
        raise ValueError(f"{checkpoint} has no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of its base model "
                         "into the folder") from e


def teacher_weights(s: EvalSettings) -> tuple[Path | None, str | None]:
    """(LoRA delta folder to take back out of merged q/k/v, or None; why the original weights
    cannot be had, or None).

    A distilled ``final`` with a merged LoRA names its delta in config.json
    (``linearize_merged_lora``). A ``final`` distilled before that record (its run folder
    beside it, LoRA merged, no ``linearize_base_model``) cannot give its teacher back.
    """
    import yaml

    path = Path(s.checkpoint)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    merged = config.get("linearize_merged_lora")
    if merged:
        delta = path / merged
        if not (delta / "adapter_config.json").is_file():
            return None, (f"its q/k/v hold a merged LoRA whose delta {delta} is missing, so the original "
                          "weights cannot be had")
        if s.adapter:
            return None, "it holds a merged LoRA and --adapter adds another; evaluate the base model on its own"
        return delta, None
    recipe = path.parent / "recipe.yaml"
    if "linearize_base_model" not in config and recipe.is_file() and (path.parent / "checkpoints").is_dir():
        tree = yaml.safe_load(recipe.read_text()) or {}
        if (tree.get("stage2") or {}).get("enabled", True) and not tree.get("save_adapter"):
            return None, ("it was distilled before finals recorded their LoRA delta: its q/k/v hold the merged "
                          "LoRA, so the original weights cannot be had (evaluate the base model on its own)")
    return None, None


def unmerge_lora(model) -> int:
    """Subtract every LoRA layer's delta from its base weight (the merge undone), in float64
    rounded once, so the base weights are the original ones and the adapter the student's.
    Returns the number of layers."""
    import torch
    from peft.tuners.lora import LoraLayer

    n = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                for name in module.active_adapters:
                    delta = module.get_delta_weight(name)
                    weight.copy_((weight.double() - delta.double()).to(weight.dtype))
                n += 1
    return n


def check_metrics(metrics: list[str]) -> None:
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s): {', '.join(bad)}; choose from {', '.join(METRICS)}")


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for sub in group_subtasks[name] for leaf in _leaves(sub, group_subtasks)]


def task_scores(results: dict, tasks: list[str]) -> dict[str, dict]:
    """Pick the reported number per requested task from an lm-eval results dict.

    Returns ``{task: {"metric", "value", "stderr", "num_fewshot", "samples"}}`` with value
    and stderr in percent (stderr None when lm-eval has none).
    """
    out = {}
    table = {**results.get("results", {}), **results.get("groups", {})}
    for task in tasks:
        row = table.get(task, {})
        metric = TASK_METRIC.get(task, "acc")
        key = f"{metric},none"
        if key not in row:
            numeric = [k for k, v in row.items() if "," in k and "_stderr" not in k
                       and isinstance(v, (int, float))]
            key = numeric[0] if numeric else key
            metric = key.split(",")[0]
        value = row.get(key)
        stderr = row.get(key.replace(",", "_stderr,", 1))
        leaves = _leaves(task, results.get("group_subtasks", {}))
        shots = {results.get("n-shot", {}).get(leaf) for leaf in leaves} - {None}
        samples = sum(results.get("n-samples", {}).get(leaf, {}).get("effective", 0) for leaf in leaves)
        out[task] = {
            "metric": metric,
            "value": None if value is None else 100.0 * value,
            "stderr": 100.0 * stderr if isinstance(stderr, (int, float)) else None,
            "num_fewshot": shots.pop() if len(shots) == 1 else (sorted(shots) if shots else None),
            "samples": samples,
        }
    return out


def recovery(student: float | None, teacher: float | None) -> float | None:
    """``100 * student / teacher`` (None when either is missing or the teacher is 0)."""
    if student is None or teacher is None or teacher == 0:
        return None
    return 100.0 * student / teacher


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def run_evaluation(settings: EvalSettings, out_dir: str | Path, log=print) -> dict:
    """Run everything ``settings`` asks for, write the run folder, return results.json's dict.

    Raises ``ValueError``/``FileNotFoundError`` on bad input before loading anything.
    """
    run = Evaluation(settings, Path(out_dir), log)
    run.load()
    run.tasks()
    run.perplexity_and_agreement()
    run.recall_probes()
    run.long_documents()
    run.long_recall()
    return run.write()


class Evaluation:
    """One evaluation run: its inputs checked when made (before anything loads), then one model
    loaded for both roles (`load`) and each metric added to `results`, results.json's dict."""

    def __init__(self, settings: EvalSettings, out: Path, log=print):
        from .lm_model import check_checkpoint
        from .long_documents import long_documents

        s, self.out, self.log = settings, out, log
        check_settings(s)
        check_metrics(s.metrics)
        path, _ = check_checkpoint(s.checkpoint, s.adapter)  # a hub id becomes its snapshot folder
        s = dataclasses.replace(s, checkpoint=str(path))
        check_tokenizer(s.checkpoint)
        # A missing document package fails here, before the model loads.
        self.long_docs = long_documents("heldout")[: s.long_doc_documents] if "long-doc" in s.metrics else []
        self.task_manager = task_manager_for(s)
        self.notes: list[str] = []
        self.delta, no_teacher = teacher_weights(s) if s.teacher or "agreement" in s.metrics else (None, None)
        if no_teacher:
            self.notes.append(f"No teacher: {no_teacher}. Teacher, recovery and agreement are left out.")
            log(self.notes[-1])
            s = dataclasses.replace(s, teacher=False, metrics=[m for m in s.metrics if m != "agreement"])
        self.s = s

    def load(self) -> None:
        """Load the checkpoint once for both roles and start `results`."""
        import torch

        from .lm_model import LinearizeLM

        s = self.s
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.t0 = time.time()
        self.lm = LinearizeLM(pretrained=s.checkpoint, adapter=self.delta or s.adapter, batch_size=s.batch_size,
                              device=device, dtype=s.dtype, allow_nonfinite=s.allow_nonfinite)
        (self.out / "plots").mkdir(parents=True, exist_ok=True)
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self._adjust_model()
        linearized = self.lm.is_linearized
        self.distinct = linearized or s.adapter is not None  # else the teacher is the student itself
        self.roles = ["student"] + (["teacher"] if s.teacher else [])
        if s.teacher and not self.distinct:
            self.notes.append("The checkpoint is not linearized and has no adapter: the teacher is the "
                              "same model, so its numbers are the student's (not run twice).")
        self._check_probe_lengths()
        self.log(f"loaded {s.checkpoint} ({'linearized' if linearized else 'plain HF'}) on {device} "
                 f"in {time.time() - self.t0:.1f}s")
        self.results = {
            "format": FORMAT, "checkpoint": str(Path(s.checkpoint).resolve()),
            "adapter": str(Path(s.adapter).resolve()) if s.adapter else None, "is_linearized": linearized,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": asdict(s),
            "tasks": {}, "metrics": {}, "plots": {}, "notes": self.notes,
        }

    def _adjust_model(self) -> None:
        """The sparse cache the settings ask for, and a merged LoRA's delta taken back out."""
        s = self.s
        if s.sparse_cache is not None or s.sparse_block is not None or s.sparse_per_kv_head is not None:
            from linearize.sparse_cache import pairs_kept_per, set_sparse_cache

            config = set_sparse_cache(self.model, s.sparse_cache, s.sparse_block, s.sparse_per_kv_head).config.linearize
            heads = pairs_kept_per(config.get("sparse_per_kv_head", False))
            self.notes.append(f"LoLA's sparse cache: {config['sparse_cache']} pairs per layer and {heads}, selected "
                              f"every {config['sparse_block']} tokens.")
        if self.delta is not None:
            layers = unmerge_lora(self.model)
            self.notes.append(f"The checkpoint's q/k/v hold a merged LoRA: its delta ({self.delta.name}) was taken "
                              f"back out of {layers} layers and applied as an adapter, so the teacher runs the "
                              "original weights.")

    def _check_probe_lengths(self) -> None:
        """Passkey and long-recall lengths the tokenizer cannot build fail now, before any metric runs."""
        if "passkey" in self.s.metrics:
            from .passkey import make_passkey_sample

            for length in self.s.passkey_lengths:
                make_passkey_sample(self.tok, length, 0.0)
        if "long-recall" in self.s.metrics:
            check_long_recall(self.tok, self.s)

    def for_roles(self, fn, contexts: bool = True) -> dict:
        """{role: fn(role)}, each role under `linearize.teacher` or not and its progress label
        (`contexts=False`: fn switches roles itself); a teacher that is the student itself is
        not run again."""
        from linearize import teacher

        from .progress import progress_bars

        res = {}
        for role in self.roles:
            if role == "teacher" and not self.distinct:
                res[role] = res["student"]
                continue
            if not contexts:
                res[role] = fn(role)
                continue
            with teacher(self.model, role == "teacher"), progress_bars(self.s.progress, label=role):
                res[role] = fn(role)
        return res

    def _plot(self, plot, data, name: str) -> str:
        """Draw `plot(data)` into plots/<name>.png; its path relative to the run folder."""
        return str(plot(data, self.out / "plots" / f"{name}.png").relative_to(self.out))

    def tasks(self) -> None:
        """lm-eval's tasks for each role, one row per task, and their bar chart."""
        from .plots import plot_tasks

        s = self.s
        if not s.tasks:
            return
        by_role = self.for_roles(self._run_tasks, contexts=False)
        for task in s.tasks:
            st = by_role["student"][task]
            row = {k: st[k] for k in ("metric", "num_fewshot", "samples")}
            for role in self.roles:
                row[role] = by_role[role][task]["value"]
                row[f"{role}_stderr"] = by_role[role][task]["stderr"]
            if s.teacher:
                row["recovery"] = recovery(row["student"], row["teacher"])
            self.results["tasks"][task] = row
        if s.teacher:
            bars = {t: {r: self.results["tasks"][t][r] for r in ("teacher", "student")
                        if self.results["tasks"][t][r] is not None} for t in s.tasks}
            self.results["plots"]["tasks"] = self._plot(plot_tasks, bars, "tasks")

    def _run_tasks(self, role: str) -> dict:
        """lm-eval on one role (`LinearizeLM.use_teacher` switches it); the raw output is kept."""
        import lm_eval

        s, t = self.s, time.time()
        limit = int(s.limit) if s.limit is not None and float(s.limit).is_integer() else s.limit
        self.lm.use_teacher = role == "teacher"
        r = lm_eval.simple_evaluate(
            model=self.lm, tasks=s.tasks, task_manager=self.task_manager, limit=limit, num_fewshot=s.num_fewshot,
            log_samples=False, random_seed=s.seed, numpy_random_seed=s.seed,
            torch_random_seed=s.seed, fewshot_random_seed=s.seed, verbosity="WARNING",
        )
        self.lm.use_teacher = False
        (self.out / f"lm_eval_{role}.json").write_text(
            json.dumps(r, indent=1, default=_json_default, ensure_ascii=False))
        self.log(f"lm-eval {role}: {', '.join(s.tasks)} in {time.time() - t:.1f}s")
        return task_scores(r, s.tasks)

    def perplexity_and_agreement(self) -> None:
        """Held-out perplexity per role, and next-token agreement of the student with the teacher."""
        from .agreement import teacher_agreement
        from .heldout import heldout_texts
        from .perplexity import perplexity
        from .plots import plot_agreement
        from .progress import progress_bars

        s, model, tok = self.s, self.model, self.tok
        texts = heldout_texts(s.ppl_texts) if {"ppl", "agreement"} & set(s.metrics) else []
        if "ppl" in s.metrics:
            t = time.time()
            ppl = self.for_roles(lambda role: perplexity(model, tok, texts, s.max_length, s.stride, s.batch_size))
            if s.teacher:
                ppl["recovery"] = recovery(ppl["teacher"]["perplexity"], ppl["student"]["perplexity"])
            self.results["metrics"]["perplexity"] = ppl
            self.log(f"perplexity in {time.time() - t:.1f}s: "
                     + ", ".join(f"{r} {ppl[r]['perplexity']:.3f}" for r in self.roles))
        if "agreement" not in s.metrics:
            return
        if not self.distinct:
            self.notes.append("Agreement skipped: the student is its own teacher (not linearized, no "
                              "adapter), so agreement is 100% and KL 0.")
            return
        t = time.time()
        with progress_bars(s.progress):
            agr = teacher_agreement(model, None, tok, texts, max_length=s.agreement_length, batch_size=s.batch_size)
        self.results["metrics"]["agreement"] = agr
        self.results["plots"]["agreement"] = self._plot(plot_agreement, {"student": agr}, "agreement")
        self.log(f"agreement in {time.time() - t:.1f}s: top-1 {agr['top1_agreement']:.2f}%, KL {agr['kl_mean']:.4f}")

    def recall_probes(self) -> None:
        """Passkey retrieval and MQAR per role, each with its figure."""
        from .mqar import mqar_accuracy
        from .passkey import passkey_retrieval
        from .plots import plot_mqar, plot_passkey

        s, model, tok = self.s, self.model, self.tok
        probes = {
            "passkey": (lambda: passkey_retrieval(model, tok, s.passkey_lengths, s.passkey_depths, s.passkey_trials,
                                                  s.seed), plot_passkey),
            "mqar": (lambda: mqar_accuracy(model, tok, s.mqar_pairs, s.mqar_samples, s.seed, s.batch_size),
                     plot_mqar),
        }
        for name, (probe, plot) in probes.items():
            if name not in s.metrics:
                continue
            t = time.time()
            res = self.for_roles(lambda role: probe())
            if s.teacher:
                res["recovery"] = recovery(res["student"]["mean_accuracy"], res["teacher"]["mean_accuracy"])
            self.results["metrics"][name] = res
            self.results["plots"][name] = self._plot(plot, {r: res[r] for r in self.roles}, name)
            self.log(f"{name} in {time.time() - t:.1f}s")

    def long_documents(self) -> None:
        """Perplexity by position over long held-out documents, per role."""
        from .long_documents import long_document_perplexity

        s = self.s
        if "long-doc" not in s.metrics:
            return
        t = time.time()
        res = self.for_roles(lambda role: long_document_perplexity(
            self.model, self.tok, self.long_docs, s.long_doc_tokens, s.long_doc_buckets))
        if s.teacher:
            res["recovery"] = recovery(res["teacher"]["overall"]["perplexity"], res["student"]["overall"]["perplexity"])
        self.results["metrics"]["long_doc"] = res
        self.log(f"long-doc perplexity in {time.time() - t:.1f}s: "
                 + ", ".join(f"{r} {res[r]['overall']['perplexity']:.3f}" for r in self.roles))

    def long_recall(self) -> None:
        """Passkey and MQAR at long lengths, per role."""
        s = self.s
        if "long-recall" not in s.metrics:
            return
        t = time.time()
        res = self.for_roles(lambda role: long_recall(self.model, self.tok, s))
        if s.teacher:
            for probe in ("passkey", "mqar"):
                res[f"{probe}_recovery"] = recovery(res["student"][probe]["mean_accuracy"],
                                                    res["teacher"][probe]["mean_accuracy"])
        self.results["metrics"]["long_recall"] = res
        self.log(f"long-recall in {time.time() - t:.1f}s")

    def write(self) -> dict:
        """results.json and results.md into the run folder; returns the results."""
        self.results["seconds"] = time.time() - self.t0
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=_json_default))
        (self.out / "results.md").write_text(run_markdown(self.results, title=Path(self.s.checkpoint).name))
        return self.results


def task_manager_for(s: EvalSettings):
    """lm-eval's task index for `s.tasks` (None without tasks), the tasks and their data checked."""
    if not s.tasks:
        return None
    import linearize.eval as le

    # Indexing lm-eval's own ~15k task configs takes seconds: only when a task needs it.
    tm = le.task_manager(include_path=s.include_path or None, include_defaults=False)
    if not set(s.tasks) <= set(tm.all_tasks):
        tm = le.task_manager(include_path=s.include_path or None)
    check_tasks(s.tasks, tm)
    check_task_data(s.tasks, tm)
    return tm


def check_long_recall(tokenizer, s: EvalSettings) -> None:
    """Raise ``ValueError`` when a long-recall prompt would not fit its length or would put a
    key closer than ``s.long_min_distance`` tokens to its question (cheap: builds, never runs)."""
    from .mqar import make_mqar_sample
    from .passkey import make_passkey_sample

    distances = [(f"passkey length {L} depth {d}", make_passkey_sample(tokenizer, L, d).distance)
                 for L in s.long_lengths for d in s.long_passkey_depths]
    distances += [(f"MQAR length {L} with {n} pairs", make_mqar_sample(tokenizer, n, length=L).gap)
                  for L in s.long_lengths for n in s.long_mqar_pairs]
    close = [f"{what} ({n} tokens)" for what, n in distances if n < s.long_min_distance]
    if close:
        raise ValueError(f"long-recall keys closer than min_distance={s.long_min_distance} tokens to their "
                         f"question: {'; '.join(close)}. Use smaller depths, fewer pairs or longer lengths")


def long_recall(model, tokenizer, s: EvalSettings) -> dict:
    """Passkey and MQAR at ``s.long_lengths`` with every key at least ``s.long_min_distance``
    tokens before its question (beyond a sliding window shorter than that).

    Returns ``{"passkey": passkey_retrieval(...), "mqar": {"lengths", "by_length":
    [mqar_accuracy(...) per length], "mean_accuracy"}}``.
    """
    from .mqar import mqar_accuracy
    from .passkey import passkey_retrieval

    passkey = passkey_retrieval(model, tokenizer, s.long_lengths, s.long_passkey_depths, s.passkey_trials,
                                s.seed, min_distance=s.long_min_distance)
    by_length = [mqar_accuracy(model, tokenizer, s.long_mqar_pairs, s.long_mqar_samples, s.seed, s.batch_size,
                               length=L) for L in s.long_lengths]
    mean = sum(r["mean_accuracy"] for r in by_length) / len(by_length) if by_length else None
    return {"passkey": passkey,
            "mqar": {"lengths": list(s.long_lengths), "by_length": by_length, "mean_accuracy": mean}}


def pct(x: float | None, stderr: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.1f}" + (f" ± {stderr:.1f}" if stderr else "")


def task_table(results: dict) -> str:
    """Markdown table of the lm-eval tasks: teacher and student side by side, recovery %."""
    teacher = results["settings"]["teacher"]
    head = "| Task | Metric | Shots | " + ("Teacher | Student | Recovery |" if teacher else "Student |")
    sep = "|---|---|---|" + ("---:|---:|---:|" if teacher else "---:|")
    lines = [head, sep]
    for task, row in results["tasks"].items():
        cells = [task, row["metric"], str(row["num_fewshot"])]
        if teacher:
            cells += [pct(row["teacher"], row.get("teacher_stderr")),
                      pct(row["student"], row.get("student_stderr")), pct(row.get("recovery"))]
        else:
            cells.append(pct(row["student"], row.get("student_stderr")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_rows(results: dict) -> list[tuple[str, str | None, str, str | None]]:
    """``(name, teacher, student, recovery)`` strings for our own metrics."""
    m = results["metrics"]
    rows = []
    if "perplexity" in m:
        p = m["perplexity"]
        rows.append(("held-out perplexity (lower is better)",
                     f"{p['teacher']['perplexity']:.3f}" if "teacher" in p else None,
                     f"{p['student']['perplexity']:.3f}", pct(p.get("recovery")) if "recovery" in p else None))
    if "agreement" in m:
        a = m["agreement"]
        rows.append(("top-1 agreement with teacher %", None, f"{a['top1_agreement']:.2f}", None))
        rows.append(("KL(teacher ‖ student), nats/token", None, f"{a['kl_mean']:.4f}", None))
    for key, name in (("passkey", "passkey retrieval %"), ("mqar", "MQAR recall %")):
        if key in m:
            r = m[key]
            rows.append((name, pct(r["teacher"]["mean_accuracy"]) if "teacher" in r else None,
                         pct(r["student"]["mean_accuracy"]), pct(r.get("recovery")) if "recovery" in r else None))
    if "long_doc" in m:
        r = m["long_doc"]
        for i, b in enumerate(r["student"]["buckets"]):
            rows.append((f"long-doc perplexity, tokens {_span(b)}",
                         _ppl(r["teacher"]["buckets"][i]) if "teacher" in r else None, _ppl(b), None))
        rows.append(("long-doc perplexity, all", _ppl(r["teacher"]["overall"]) if "teacher" in r else None,
                     _ppl(r["student"]["overall"]), pct(r.get("recovery")) if "recovery" in r else None))
    if "long_recall" in m:
        r = m["long_recall"]
        for probe, name in (("passkey", "long passkey %"), ("mqar", "long MQAR recall %")):
            rows.append((f"{name} ({'/'.join(str(L) for L in r['student'][probe]['lengths'])} tokens)",
                         pct(r["teacher"][probe]["mean_accuracy"]) if "teacher" in r else None,
                         pct(r["student"][probe]["mean_accuracy"]),
                         pct(r.get(f"{probe}_recovery")) if f"{probe}_recovery" in r else None))
    return rows


def _span(bucket: dict) -> str:
    return "-".join(f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x) for x in (bucket["start"], bucket["end"]))


def _ppl(row: dict) -> str:
    return "—" if row["perplexity"] is None else f"{row['perplexity']:.3f}"


def metrics_table(results: dict) -> str:
    """Markdown table of our own metrics (teacher / student / recovery)."""
    teacher = results["settings"]["teacher"]
    lines = ["| Metric | " + ("Teacher | Student | Recovery |" if teacher else "Student |"),
             "|---|" + ("---:|---:|---:|" if teacher else "---:|")]
    for name, t, st, rec in metric_rows(results):
        cells = [name] + ([t or "—", st, rec or "—"] if teacher else [st])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_markdown(results: dict, title: str, plot_prefix: str = "") -> str:
    """The markdown page of one run (tables, plots, notes)."""
    s = results["settings"]
    parts = [f"# {title}", "",
             f"Checkpoint `{results['checkpoint']}`"
             + (f" + adapter `{results['adapter']}`" if results["adapter"] else "")
             + (" (linearized)" if results["is_linearized"] else " (plain HF model)")
             + f"; {results['created']}"
             + (f"; lm-eval limit {s['limit']}" if s["limit"] else "") + ".", ""]
    if results["tasks"]:
        parts += ["## lm-eval tasks", "", task_table(results), ""]
        if s["teacher"]:
            parts += ["Recovery = student / teacher. Scores in %, ± one standard error.", ""]
    if results["metrics"]:
        parts += ["## Own metrics", "", metrics_table(results), ""]
        m = results["metrics"]
        if "perplexity" in m:
            p = m["perplexity"]["student"]
            parts += [f"Perplexity: {p['texts']} held-out Wikipedia summaries, {p['tokens']} scored "
                      f"tokens, windows of {p['max_length']} with stride {p['stride']}"
                      + ("; recovery = teacher ppl / student ppl." if "recovery" in m["perplexity"] else "."), ""]
        if "long_doc" in m:
            d = m["long_doc"]["student"]
            parts += [f"Long-document perplexity: the first {d['n_tokens']} tokens of {len(d['documents'])} "
                      "held-out documents (linearize.eval.long_documents), one forward each, bucketed by "
                      "target position" + ("; recovery = teacher ppl / student ppl." if "recovery" in m["long_doc"]
                                           else "."), ""]
    for key, caption in (("tasks", "Task scores"), ("agreement", "Agreement by position"),
                         ("passkey", "Passkey retrieval"), ("mqar", "MQAR recall")):
        if key in results["plots"]:
            parts += [f"![{caption}]({plot_prefix}{results['plots'][key]})", ""]
    if results["notes"]:
        parts += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(parts)
