"""Quality at length: distill each method at 2,048-token rows of long documents, then score
it beside the teacher and the window + sinks baseline on text the training never saw.

    python scripts/quality_at_length.py [--runs NAME ...] [--stage1-tokens N] [--stage2-tokens N]
                                        [--work DIR --doc FILE]   (another budget beside this one)
    python scripts/quality_at_length.py --render [--doc FILE ...]   (the page from its records only)

Per run (outputs/quality/<run>/, every step reused when its file exists):
  recipe.yaml + the `linearize distill` run (skipped for untrained entries); then its record,
  docs/data/<doc name>/<run>.json (committed, so the page can be rebuilt without the models):
  held-out summaries (64 texts, 1,024-token windows), the same summaries joined into
  1,024-token documents, the long held-out documents bucketed by position (0-64, 64-512,
  512-2k, 2k-4k), passkey and MQAR at 2k/4k with every key >= 256 tokens before its question.
  plus the training time and the stage-2 held-out perplexity curve.
Training text: the long documents' train split (never the held-out ones); writes
docs/quality-at-length.md and its plots from every record in its data folder. The runs are
defined in quality_runs.py, the page is rendered by quality_page.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from quality_page import write_document
from quality_runs import RECIPE_EXTRAS, RUNS, SPARSE, sparse_settings

WORK = Path("outputs/quality")
DOC = Path("docs/quality-at-length.md")
MEASUREMENTS = ("short", "curve_ref", "joined", "long_doc", "passkey", "mqar")


def data_dir() -> Path:
    """Where the page's records live: docs/data/<doc name>/."""
    return DOC.parent / "data" / DOC.stem


def recipe(name: str, config: dict, stage1: bool, train_new: bool, args) -> dict:
    tree = shared_recipe(name, config, stage1, train_new, args)
    for section, values in RECIPE_EXTRAS.get(name, {}).items():
        tree[section] = {**tree[section], **values}
    return tree


def shared_recipe(name: str, config: dict, stage1: bool, train_new: bool, args) -> dict:
    return {
        "output_dir": str(WORK / name / "run"),
        "seed": 0,
        "model": {"path": None, "dtype": "float32"},
        "linearize": config,
        "data": {"source": str(WORK / "train.jsonl"), "format": "text", "packing": True, "boundaries": "auto"},
        "seq_len": args.seq_len,
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "stage1": {"enabled": stage1, "max_tokens": args.stage1_tokens, "loss_reduction": "mean",
                   "optimizer": {"lr": 1.0e-2, "scheduler": "cosine", "warmup_ratio": 0.0, "max_grad_norm": 1.0}},
        "stage2": {"enabled": True, "max_tokens": args.stage2_tokens, "kd_ratio": 0.0,
                   "train_new_parameters": train_new, "gradient_checkpointing": args.gradient_checkpointing,
                   "optimizer": {"lr": 1.0e-3, "scheduler": "cosine", "warmup_ratio": 0.1, "max_grad_norm": 1.0},
                   "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}},
        "eval": {"every_tokens": args.eval_every, "stages": [2], "texts": 16, "seq_len": 1024},
        "checkpoint_every": 1000,
        "keep_checkpoints": 1,
        "save_adapter": False,
    }


def train(name: str, args) -> Path | None:
    if name in SPARSE:
        return train(SPARSE[name][0], args)
    spec = RUNS[name]
    if spec is None or spec[1] is None:
        return None
    out = WORK / name / "run"
    if (out / "final" / "config.json").is_file():
        return out / "final"
    path = WORK / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(name, *spec, args), sort_keys=False))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "linearize.distill", str(path)], check=True)
    (WORK / name / "train_time.json").write_text(json.dumps({"seconds": time.time() - t0}))
    return out / "final"


def load(name: str, final: Path | None):
    import linearize
    from linearize.assets import default_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = default_model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    source, sparse = SPARSE.get(name, (name, None))[0], sparse_settings(name)
    if final is not None:
        return linearize.load(str(final), **sparse).eval(), tok
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if RUNS[source] is not None:
        linearize.convert(model, linearize.LinearizeConfig(**RUNS[source][0]))
        if sparse:
            linearize.set_sparse_cache(model, sparse["sparse_cache"], block=sparse.get("sparse_block"),
                                       per_kv_head=sparse["sparse_per_kv_head"])
    return model, tok


def metrics(model, tok, args) -> dict:
    """name -> thunk computing one measurement (so a finished one is never recomputed)."""
    from linearize.eval.heldout import heldout_texts, joined_heldout_documents
    from linearize.eval.long_documents import long_document_perplexity, long_documents
    from linearize.eval.mqar import mqar_accuracy
    from linearize.eval.passkey import passkey_retrieval
    from linearize.eval.perplexity import perplexity

    return {
        "short": lambda: perplexity(model, tok, heldout_texts(64), 1024, 512, 4),
        "curve_ref": lambda: perplexity(model, tok, heldout_texts(16), 1024, 512, 4),
        "joined": lambda: perplexity(model, tok, joined_heldout_documents(tok, 48, 1024), 1024, 512, 1),
        "long_doc": lambda: long_document_perplexity(model, tok, long_documents("heldout"), args.long_tokens),
        "passkey": lambda: passkey_retrieval(model, tok, args.lengths, [0.1, 0.3, 0.5, 0.7], 1, min_distance=256),
        "mqar": lambda: [mqar_accuracy(model, tok, num_pairs=(16,), num_samples=8, length=L, batch_size=1)
                         for L in args.lengths],
    }


def training_record(name: str) -> dict:
    """Training time (s) and the stage-2 held-out perplexity curve [(tokens, ppl)] of a run
    trained here (untrained entries and LoLA entries have none: their source run holds it), and
    the budget label of a run, or a LoLA entry's source run, whose stage 1 is its own."""
    out, log, t = {}, WORK / name / "run" / "metrics.jsonl", WORK / name / "train_time.json"
    source = SPARSE.get(name, (name, None))[0]
    if "stage1" in RECIPE_EXTRAS.get(source, {}) and (WORK / source / "recipe.yaml").is_file():
        # a stage 1 of its own: the page's budget is not this run's (nor its LoLA entry's)
        out["budget"] = budget_label(yaml.safe_load((WORK / source / "recipe.yaml").read_text()))
    if t.is_file():
        out["train_seconds"] = json.loads(t.read_text())["seconds"]
        stage2 = yaml.safe_load((WORK / name / "recipe.yaml").read_text())["stage2"]
        out["gradient_checkpointing"] = bool(stage2.get("gradient_checkpointing"))
    if log.is_file():
        pts = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        out["curve"] = [(p["tokens"], p["eval_ppl"]) for p in pts if "eval_ppl" in p and p.get("stage") == 2]
    return out


def budget_label(tree: dict) -> str:
    """'176k tokens, 4,096-token rows (stage 1: 64k at 1,024)' from a run's recipe."""
    s1, s2, seq = tree["stage1"], tree["stage2"], tree["seq_len"]
    s1_tokens = s1["max_tokens"] if s1.get("enabled", True) else 0
    label = f"{(s1_tokens + s2['max_tokens']) // 1024}k tokens, {seq:,}-token rows"
    if s1_tokens and s1.get("seq_len") not in (None, seq):
        label += f" (stage 1: {s1_tokens // 1024}k at {s1['seq_len']:,})"
    return label


def evaluate(name: str, final: Path | None, args) -> dict:
    """The run's record, computing only the measurements it does not hold yet."""
    out = data_dir() / f"{name}.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update(training_record(name))
    model, tok = None, None
    for key in MEASUREMENTS:
        if key in res:
            continue
        if model is None:
            model, tok = load(name, final)
        t0 = time.time()
        with torch.no_grad():
            res[key] = metrics(model, tok, args)[key]()
        res.setdefault("seconds", {})[key] = time.time() - t0
        save_record(out, res)
    save_record(out, res)
    return res


def save_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))


def main(argv=None) -> None:
    global WORK, DOC
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--stage1-tokens", type=int, default=16384)
    p.add_argument("--stage2-tokens", type=int, default=32768)
    p.add_argument("--eval-every", type=int, default=16384)
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only-train", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layers in stage 2's backward pass (same weights, far less memory)")
    p.add_argument("--render", action="store_true", help="only rewrite the page from the records in its data folder")
    p.add_argument("--work", type=Path, default=WORK, help="runs' folder (one per budget)")
    p.add_argument("--doc", type=Path, default=DOC, help="the document to write")
    args = p.parse_args(argv)
    WORK, DOC = args.work, args.doc
    if args.threads:
        torch.set_num_threads(args.threads)
    from linearize.eval.long_documents import write_jsonl

    if args.render:
        args.runs = []
    elif not (WORK / "train.jsonl").is_file():
        write_jsonl(WORK / "train.jsonl", "train")
    results = {}
    for name in args.runs:
        final = train(name, args)
        if not args.only_train:
            results[name] = evaluate(name, final, args)
    for name in RUNS:
        done = data_dir() / f"{name}.json"
        if name not in results and done.is_file():
            results[name] = json.loads(done.read_text())
    if results:
        print(f"wrote {write_document({n: results[n] for n in RUNS if n in results}, args)}")


if __name__ == "__main__":
    main()
