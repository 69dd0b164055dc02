"""Run the results pipeline: train, evaluate and benchmark every method, one cached step at a time.

Per method (`METHOD_ENTRIES`) the steps write, under ``work_dir/<method>/``:

- ``recipe.yaml`` and ``run/`` (a `linearize distill` run; the untrained baseline is only
  converted and saved to ``converted/``),
- ``untrained.json`` (perplexity straight after conversion),
- ``eval/results.json`` (`linearize eval`: held-out perplexity, teacher agreement, passkey, local
  MMLU) and ``long_ppl.json`` (perplexity on joined documents of ``long_length`` tokens),
- ``speed.json`` (prefill and decode at ``speed_length``, teacher beside student).

The teacher gets the same evaluation once, and the headline benchmarks (prefill, decode, train,
CPU kernels; default Liger-GLA conversion) go to ``work_dir/bench/``. Every step is skipped
when its output file exists, so an interrupted run continues where it stopped; ``--redo``
names steps to run again. `render.write_document` then turns what the steps wrote into markdown.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

import linearize
from linearize.assets import default_model_dir
from linearize.model_folder import load_base_model
from linearize.distill.checkpointing import write_atomic
from linearize.distill.recipe import load_recipe
from linearize.distill.train import distill
from linearize.eval.bench.cli_commands import load_bench_model, run_kernels
from linearize.eval.bench.decode import bench_decode, decode_summary, run_decode
from linearize.eval.bench.prefill import bench_prefill, prefill_summary, run_prefill
from linearize.eval.bench.train import run_train
from linearize.eval.heldout import heldout_texts, joined_heldout_documents
from linearize.eval.perplexity import perplexity
from linearize.eval.runner import EvalSettings, run_evaluation

from .render import write_document
from .settings import ENTRY_BY_NAME, RECIPES_DIR, MethodEntry, ResultsSettings

def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


class ResultsRun:
    """Runs the pipeline of `ResultsSettings`, one cached step at a time."""

    def __init__(self, settings: ResultsSettings, log=print):
        settings.check()
        self.s = settings
        self.work = Path(settings.work_dir)
        self.log = log
        self._model_path: str | None = None
        self._num_layers: int | None = None

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            if self.s.model:
                self._model_path = str(Path(self.s.model).expanduser())
            else:
                self._model_path = str(default_model_dir())
        return self._model_path

    def _todo(self, step: str, output: Path) -> bool:
        return step in self.s.redo or not output.exists()

    def _skipped(self, step: str, output: Path) -> bool:
        """True when `step` is skipped and has no earlier output to show (rendered as —)."""
        return step in self.s.skip and not output.exists()

    # -- training -------------------------------------------------------------------------

    def recipe_tree(self, entry: MethodEntry) -> dict:
        """The recipe of `entry` as a dict: its recipes/ file with the settings' budgets."""

        tree = yaml.safe_load((RECIPES_DIR / entry.recipe).read_text())
        tree["output_dir"] = str(self.work / entry.name / "run")
        tree["model"]["path"] = self.s.model
        tree["linearize"] = self.config_for(entry)
        tree["seq_len"] = self.s.seq_len
        tree["batch_size"] = 1
        tree["gradient_accumulation_steps"] = self.s.gradient_accumulation_steps
        tree["stage1"]["max_tokens"] = self.s.stage1_tokens
        tree["stage2"]["max_tokens"] = self.s.stage2_tokens
        tree["checkpoint_every"] = 8
        tree["progress"] = self.s.progress
        return tree

    def config_for(self, entry: MethodEntry) -> dict:
        if self._num_layers is None:
            self._num_layers = AutoConfig.from_pretrained(self.model_path).num_hidden_layers
        return entry.resolved_config(self._num_layers)

    def checkpoint(self, entry: MethodEntry) -> Path:
        """The folder evaluated for `entry`: the distilled model, or the plain conversion."""
        base = self.work / entry.name
        return base / ("run/final" if entry.recipe else "converted")

    def train(self, entry: MethodEntry) -> Path:
        final = self.checkpoint(entry)
        if not self._todo("train", final / "config.json"):
            return final
        if entry.recipe is None:
            model, tok, _ = load_base_model(self.model_path, None)
            linearize.convert(model, linearize.LinearizeConfig.from_dict(self.config_for(entry)))
            model.save_pretrained(final)
            if tok is not None:
                tok.save_pretrained(final)
            return final

        recipe_path = self.work / entry.name / "recipe.yaml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(yaml.safe_dump(self.recipe_tree(entry), sort_keys=False))
        resume = (final.parent / "checkpoints").is_dir() and "train" not in self.s.redo
        self.log(f"[results] {entry.name}: distill {recipe_path}{' (resuming)' if resume else ''}")
        return distill(load_recipe(recipe_path, [f"resume={str(resume).lower()}"]))

    # -- evaluation -----------------------------------------------------------------------

    def long_documents(self, tokenizer) -> list[str]:
        return joined_heldout_documents(tokenizer, self.s.long_texts, self.s.long_length)

    def _long_ppl(self, model, tokenizer) -> dict:
        docs = self.long_documents(tokenizer)
        return perplexity(model, tokenizer, docs, max_length=self.s.long_length,
                          stride=max(1, self.s.long_length // 2), batch_size=1)

    def untrained(self, entry: MethodEntry) -> dict:
        """Perplexity (per-summary and joined documents) straight after conversion."""
        out = self.work / entry.name / "untrained.json"
        if not self._todo("untrained", out):
            return _read(out)

        model, tok, _ = load_base_model(self.model_path, None)
        linearize.convert(model, linearize.LinearizeConfig.from_dict(self.config_for(entry)))
        model.eval()
        res = {"perplexity": perplexity(model, tok, heldout_texts(self.s.ppl_texts), 1024, 512, 4),
               "long_perplexity": self._long_ppl(model, tok)}
        _write(out, res)
        return res

    def evaluate(self, name: str, checkpoint: Path | str, teacher: bool = False) -> dict:
        """`linearize eval` on one checkpoint (the plain model for the teacher)."""

        out = self.work / name / "eval"
        if self._todo("eval", out / "results.json"):
            metrics = ["ppl", "passkey"] + ([] if teacher else ["agreement"])
            settings = EvalSettings(
                checkpoint=str(checkpoint), tasks=["mmlu_local"] if self.s.mmlu_limit else [],
                limit=self.s.mmlu_limit, metrics=metrics, ppl_texts=self.s.ppl_texts,
                passkey_lengths=list(self.s.passkey_lengths), device=None if torch.cuda.is_available() else "cpu")
            self.log(f"[results] {name}: evaluate {checkpoint}")
            run_evaluation(settings, out, log=lambda m: self.log(f"[results] {name}: {m}"))
        results = _read(out / "results.json")
        long_out = self.work / name / "long_ppl.json"
        if self._todo("long_ppl", long_out):
            model = linearize.load(checkpoint).eval()
            tok = AutoTokenizer.from_pretrained(checkpoint)
            _write(long_out, self._long_ppl(model, tok))
        results["long_perplexity"] = _read(long_out)
        return results

    def speed(self, entry: MethodEntry) -> dict:
        """Prefill and decode at `speed_length`, teacher and student in the same run."""
        out = self.work / entry.name / "speed.json"
        if self._skipped("speed", out):
            return None
        if not self._todo("speed", out):
            return _read(out)

        self.log(f"[results] {entry.name}: prefill and decode at {self.s.speed_length} tokens")
        model = load_bench_model(str(self.checkpoint(entry)))
        prefill = bench_prefill(model, [self.s.speed_length], self.s.speed_repeats, show_progress=self.s.progress)
        decode = bench_decode(model, [self.s.speed_length], steps=self.s.decode_steps,
                              show_progress=self.s.progress)
        res = {"length": self.s.speed_length, "prefill": prefill, "decode": decode,
               "prefill_ratio": prefill_summary(prefill)[0][0], "decode_ratio": decode_summary(decode)[0][0]}
        _write(out, res)
        return res

    def bench(self) -> dict:
        """The headline benchmarks (default Liger-GLA conversion): prefill, decode, train, kernels."""
        root = self.work / "bench"
        reports = {}
        model = None
        cuda_report = root / "kernels" / "cuda" / "kernels_cuda.json"
        if cuda_report.is_file():
            reports["kernels_cuda"] = _read(cuda_report)
        for name in ("prefill", "decode", "train", "kernels"):
            path = root / name / f"{'kernels_cpu' if name == 'kernels' else name}.json"
            if self._skipped("bench", path):
                continue
            if not self._todo("bench", path):
                reports[name] = _read(path)
                continue
            self.log(f"[results] benchmark: {name}")
            if name == "kernels":
                run_kernels(self.s.kernel_lengths, root / name, self.s.bench_repeats)
                reports[name] = _read(path)
                if cuda_report.is_file():
                    reports["kernels_cuda"] = _read(cuda_report)
                continue
            if model is None:
                model = load_bench_model(self.s.model, "liger-gla")
            p = self.s.progress
            if name == "prefill":
                reports[name] = run_prefill(model, root / name, self.s.prefill_lengths, self.s.bench_repeats,
                                            show_progress=p)
            elif name == "decode":
                reports[name] = run_decode(model, root / name, self.s.decode_contexts, steps=32, show_progress=p)
            else:
                reports[name] = run_train(model, root / name, self.s.train_lengths, max(2, self.s.bench_repeats - 1),
                                          show_progress=p)
        return reports

    # -- the whole pipeline ---------------------------------------------------------------

    def run(self) -> Path:
        """Run every missing step, then write the document; returns its path."""

        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        self.work.mkdir(parents=True, exist_ok=True)
        _write(self.work / "settings.json", asdict(self.s))
        t0 = time.time()
        collected = {"teacher": self.evaluate("teacher", self.model_path, teacher=True), "methods": {}}
        for name in self.s.methods:
            entry = ENTRY_BY_NAME[name]
            checkpoint = self.train(entry)
            collected["methods"][name] = {
                "untrained": self.untrained(entry),
                "eval": self.evaluate(name, checkpoint),
                "speed": self.speed(entry),
                "training": training_summary(self.work / name / "run") if entry.recipe else None,
            }
        collected["extra"] = {}
        for run in self.s.extra_runs:
            run = Path(run)
            config = json.loads((run / "final" / "config.json").read_text())
            collected["extra"][run.name] = {
                "eval": self.evaluate(f"extra-{run.name}", run / "final"), "training": training_summary(run),
                "method": config.get("linearize", {}).get("method"), "recipe": str(run / "recipe.yaml"),
            }
        collected["bench"] = self.bench()
        self.log(f"[results] all steps done in {time.time() - t0:.0f}s; writing {self.s.doc}")
        return write_document(self.s, collected, self.work)


def training_summary(run_dir: Path) -> dict | None:
    """Steps, tokens, seconds and losses per stage from a distill run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    stages: dict = {}
    for r in records:
        if "loss" not in r or "stage" not in r:
            continue
        st = stages.setdefault(r["stage"], {"losses": [], "tokens": 0, "seconds": 0.0, "steps": 0})
        st["losses"].append(r["loss"])
        st["tokens"] = max(st["tokens"], r.get("tokens", 0))
        st["seconds"] = max(st["seconds"], r.get("elapsed_s", 0.0))
        st["steps"] = max(st["steps"], r.get("step", 0))
    for st in stages.values():
        k = max(1, len(st["losses"]) // 10)
        st["first_loss"] = sum(st["losses"][:k]) / k
        st["last_loss"] = sum(st["losses"][-k:]) / k
        del st["losses"]
    return {"stages": stages, "records": str(path)}


