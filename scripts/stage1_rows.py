"""Does stage 1 learn? Stage 1 alone (attention transfer) of the 4-kept-layer recipe at several
row lengths and budgets, each layer's transfer MSE measured on held-out text before and after.

    python scripts/stage1_rows.py [--configs NAME ...] [--work DIR]   (runs what is missing, then the page)
    python scripts/stage1_rows.py --render                          (the page from its records only)
    python scripts/stage1_rows.py --configs stuck-default stuck-fd128 stuck-window128 stuck-l18kv2
                                      (the layers no config halves, alone, with more capacity)
    python scripts/stage1_rows.py --heads stuck-default  (that run's MSE per head, before and after)
    python scripts/stage1_rows.py --configs shipped-shared-rows2048-64k
                                      (stage 1 of the conversion `linearize convert` makes by default;
                                       shipped-rows2048-64k keeps a state per query head)

Each config runs `linearize distill recipes/smollm2-cpu-hybrid-kl4-long.yaml` with stage 2
off and eval on in stage 1 only: at step 0 and at the last step the run logs each linearized
layer's MSE on the first 4,096 tokens of 3 held-out long documents (`eval_layer_mse`) and the
student's perplexity over the same tokens. The held-out documents are cut to 4,096 tokens so
that the perplexity is one window per document. Records: docs/data/stage1-rows/<config>.json;
page: docs/stage1-rows.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

RECIPE = "recipes/smollm2-cpu-hybrid-kl4-long.yaml"
# the same recipe distilled through stage 2 by scripts/quality_at_length.py (128k page's records)
AFTER_STAGE2 = Path("docs/data/quality-at-length-128k")
AFTER_RUNS = {"recommended-kl4": "16k tokens at 4,096-token rows (4 steps)",
              "recommended-kl4-s1rows512": "16k tokens at 512-token rows (32 steps); stage 2 reads the same rows",
              "recommended-kl4-s1short": "64k tokens at 512-token rows (128 steps); stage 2 starts 48k tokens later"}
DOC = Path("docs/stage1-rows.md")
DATA = DOC.parent / "data" / DOC.stem
WINDOW = 4096
HELDOUT_DOCS = 3
# name -> (stage-1 row length, stage-1 tokens)
CONFIGS = {
    "rows4096-16k": (4096, 16384),
    "rows1024-16k": (1024, 16384),
    "rows1024-64k": (1024, 65536),
    "rows512-64k": (512, 65536),
}


class Change(NamedTuple):
    """One change to stage 1 of the stuck layers alone: the page's label, the recipe overrides and
    the stage-1 budget (at CAPACITY_SEQ_LEN-token rows)."""
    label: str
    overrides: list[str]
    tokens: int = 65536


# The layers every config above leaves above half their MSE, alone, with more capacity (best
# schedule: 64k tokens at 512-token rows), one change at a time.
STUCK_LAYERS = [18, 22, 25]
CAPACITY_SEQ_LEN = 512
CAPACITY = {
    "stuck-default": Change("as above (Hedgehog width 64, window 64)", []),
    "stuck-fd128": Change("Hedgehog width 128", ["linearize.feature_dim=128"]),
    "stuck-fd256": Change("Hedgehog width 256", ["linearize.feature_dim=256"]),
    # at the default guard.loss_ratio 10 a 13x one-row loss spike at step 85 stopped it as diverged
    "stuck-window128": Change("window 128 (divergence guard at 100x)", ["linearize.window=128", "guard.loss_ratio=100"]),
    # more tokens, not more capacity: from 16k to 64k tokens L22 went 0.73 -> 0.54 and L25 0.68 -> 0.53
    "stuck-256k": Change("4x the tokens: 262,144", [], tokens=262144),
    # layer 18's KV head 2 holds ~93 % of that layer's MSE after stage 1 and keeps ~86 % of its own:
    # the same head exact (head-level hybrid), to check what the per-head values predict (0.52)
    "stuck-l18kv2": Change("layer 18's KV head 2 exact", ["linearize.full_attention_heads={18: [2]}"]),
    # the learning rate, not the budget: L22 and L25 sit at ~0.5 from 64k to 262k tokens
    "stuck-lr3e-2": Change("LR 3e-2 (3x)", ["stage1.optimizer.lr=3.0e-2"]),
}

# Stage 1 of the conversion users get from `linearize convert` (config.RECOMMENDED: every layer
# linear, window 512; LoLA's sparse cache is inference-only, so stage 1 trains without it). Rows
# must be longer than the window, or no key ever leaves it and the linear branch sees nothing.
# name: (row length, tokens, one state and key map per KV head); the first two keep LoLCATs'
# state per query head, as the default did when they were measured.
SHIPPED_RECIPE = "recipes/smollm2-cpu-recommended-long.yaml"
SHIPPED = {
    "shipped-rows1024-64k": (1024, 65536, False),
    "shipped-rows2048-64k": (2048, 65536, False),
    "shipped-shared-rows2048-64k": (2048, 65536, True),
}


def heldout_file(work: Path) -> Path:
    """The first held-out long documents, each cut to at most WINDOW tokens, as JSON lines."""
    from linearize.assets import default_model_dir
    from linearize.eval.long_documents import long_documents
    from transformers import AutoTokenizer

    path = work / "heldout.jsonl"
    if path.is_file():
        return path
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    lines = []
    for doc in long_documents("heldout")[:HELDOUT_DOCS]:
        lo, hi = 0, len(doc.text)  # the longest prefix of at most WINDOW tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(tok(doc.text[:mid])["input_ids"]) <= WINDOW else (lo, mid - 1)
        lines.append(json.dumps({"text": doc.text[:lo]}) + "\n")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def run(name: str, work: Path) -> dict:
    """Train the config's stage 1 (unless its run exists) and return its record."""
    recipe = RECIPE
    if name in CAPACITY:
        change = CAPACITY[name]
        seq, tokens, label = CAPACITY_SEQ_LEN, change.tokens, change.label
        overrides = [f"linearize.layers={STUCK_LAYERS}".replace(" ", ""), *change.overrides]
    elif name in SHIPPED:
        from linearize.config import RECOMMENDED

        (seq, tokens, shared), recipe = SHIPPED[name], SHIPPED_RECIPE
        label = f"window {RECOMMENDED['window']}, " + ("one state per KV head" if shared else "a state per query head")
        overrides = [f"linearize.window={RECOMMENDED['window']}", f"linearize.share_state_across_group={str(shared).lower()}"]
    else:
        (seq, tokens), label, overrides = CONFIGS[name], None, []
    out = work / name
    if not (out / "final" / "config.json").is_file():
        from linearize.eval.long_documents import write_jsonl

        train = work / "train.jsonl"
        if not train.is_file():
            write_jsonl(train, "train")
        subprocess.run([sys.executable, "-m", "linearize.distill", recipe, f"output_dir={out}", "stage2.enabled=false",
                        f"data.source={train}", f"stage1.seq_len={seq}", f"stage1.max_tokens={tokens}",
                        f"eval.source={heldout_file(work)}", "eval.stages=[1]", f"eval.texts={HELDOUT_DOCS}",
                        f"eval.seq_len={WINDOW}", f"eval.stride={WINDOW - 1}", "eval.batch_size=1",
                        "eval.every_tokens=1000000000", "progress=false", *overrides],
                       check=True, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in logs if "eval_layer_mse" in r]
    steps = [r for r in logs if "loss" in r]
    record = {"seq_len": seq, "tokens": tokens, "steps": steps[-1]["step"],
              "train_seconds": steps[-1]["elapsed_s"] - sum(r["eval_s"] for r in evals[:-1]),
              "before": evals[0]["eval_layer_mse"], "after": evals[-1]["eval_layer_mse"],
              "ppl_before": evals[0]["eval_ppl"], "ppl_after": evals[-1]["eval_ppl"]}
    if label:
        record.update(label=label, overrides=overrides)
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


class HeadErrors:
    """A stage-1 transfer hook that also keeps each query head's MSE: `linearize.mixers.AttentionTransfer`'s
    interface, the error split over the heads of the per-head outputs the method compares."""

    def __init__(self, heads: int):
        self.heads, self.losses, self.per_head = heads, [], []

    def record(self, student, teacher, mask=None, scale: float = 1.0) -> None:
        """student, teacher: [B, T, H * D]; mask: [B, T] (False = padding, left out, as in stage 1)."""
        err = (student.float() - teacher.float()).pow(2)
        err = err.view(*err.shape[:2], self.heads, -1).mean(-1)  # [B, T, H]
        if mask is None:
            per_head = err.mean((0, 1)) * scale  # [H]
        else:
            weight = mask.to(err.dtype).unsqueeze(-1)
            per_head = (err * weight).sum((0, 1)) / weight.sum().clamp_min(1) * scale
        self.per_head.append(per_head)
        self.losses.append(per_head.mean())


def head_mse(model, tokenizer, texts: list[str]) -> dict[str, list[float]]:
    """{layer: [MSE x1000 per query head]} of the model's linearized layers on the texts' first
    WINDOW tokens, weighted by their token counts, each layer on the teacher's input as in stage 1."""
    import torch

    from linearize import mixers
    from linearize.distill.metrics import evaluating

    layers = list(mixers(model))
    if not layers[0].transfer_on_heads:
        raise ValueError(f"{layers[0].method.name} compares the outputs after o_proj: they have no per-head split")
    hook = HeadErrors(layers[0].num_heads)
    total, count = 0, 0
    try:
        for m in layers:
            m.transfer = hook
        with evaluating(model):
            for text in texts:
                ids = tokenizer(text)["input_ids"][:WINDOW]
                hook.per_head.clear()
                model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
                total, count = total + torch.stack(hook.per_head) * len(ids), count + len(ids)
    finally:
        for m in layers:
            m.transfer = None
    return {str(m.layer_idx): (total[i] / count).tolist() for i, m in enumerate(layers)}


def measure_heads(name: str, work: Path) -> dict:
    """Per-head held-out MSE of config `name`'s layers before stage 1 (its conversion, fresh) and
    after (its trained folder); written to DATA/<name>-heads.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import linearize

    final = work / name / "final"
    config = json.loads((final / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(final)
    texts = [json.loads(line)["text"] for line in heldout_file(work).read_text().splitlines()]
    fresh = AutoModelForCausalLM.from_pretrained(config["linearize_base_model"], dtype=torch.float32)
    linearize.convert(fresh, linearize.LinearizeConfig(**config["linearize"]))
    record = {"kv_groups": fresh.config.num_attention_heads // fresh.config.num_key_value_heads,
              "before": head_mse(fresh, tokenizer, texts), "after": head_mse(linearize.load(final), tokenizer, texts)}
    (DATA / f"{name}-heads.json").write_text(json.dumps(record, indent=1))
    return record


def heads_section(names) -> list[str]:
    """The page's per-KV-head breakdown of the configs among `names` whose heads were measured
    (`--heads`): one column per config."""
    found = {n: json.loads(path.read_text()) for n in names if (path := DATA / f"{n}-heads.json").is_file()}
    if not found:
        return []
    first = next(iter(found.values()))
    G = first["kv_groups"]

    def per_kv(values):  # a layer's query-head errors summed per KV head
        return [sum(values[h * G:(h + 1) * G]) for h in range(len(values) // G)]

    lines = ["## Which heads are stuck", "",
             f"Per KV head (the unit a head-level hybrid keeps exact: the errors of its {G} query heads summed), "
             "held-out MSE x1000 before stage 1, and after it for each config (after / before; the head's share "
             "of its layer's MSE after). `python scripts/stage1_rows.py --heads CONFIG` measures a trained "
             "config.", "",
             "| layer | KV head | before | " + " | ".join(CAPACITY[n].label if n in CAPACITY else n for n in found) + " |",
             "|---:|---:|---:|" + "---:|" * len(found)]
    kept = {n: [] for n in found}
    for layer, before in first["before"].items():
        b = per_kv(before)
        afters = {n: per_kv(r["after"][layer]) for n, r in found.items()}
        for h in range(len(b)):
            cells = [f"{a[h]:.3g} ({a[h] / b[h]:.2f}; {a[h] / sum(a):.2f})" for a in afters.values()]
            lines.append(f"| {layer} | {h} | {b[h]:.3g} | " + " | ".join(cells) + " |")
        for n, a in afters.items():
            worst = max(range(len(a)), key=a.__getitem__)
            rest_a, rest_b = sum(a) - a[worst], sum(b) - b[worst]
            kept[n].append(f"L{layer} {rest_a / rest_b:.2f} with KV head {worst} exact "
                           f"(all heads {sum(a) / sum(b):.2f})")
    lines += ["", "Each layer's after / before over its other KV heads, were the head with the largest error kept "
              "exact (`linearize.full_attention_heads`; the heads have their own feature maps, gates and mixing "
              "weights, so the others would train as they did here): "
              + "; ".join(f"{CAPACITY[n].label if n in CAPACITY else n}: " + ", ".join(k) for n, k in kept.items()) + "."]
    return [*lines, ""]


SUMMARY_HEADER = ["| stage 1 | steps | train min | mean MSE before -> after | layers halved "
                  "| worst layer (after / before) | perplexity before -> after |", "|---|---:|---:|---:|---:|---|---:|"]


def budget_text(r: dict) -> str:
    """'65,536 tokens at 2,048-token rows', after the record's label where it has one."""
    return (f"{r['label']}: " if r.get("label") else "") + f"{r['tokens']:,} tokens at {r['seq_len']:,}-token rows"


def summary_row(r: dict) -> str:
    """One config's line of a SUMMARY_HEADER table."""
    ratio = {k: r["after"][k] / r["before"][k] for k in r["before"]}
    worst = max(ratio, key=ratio.get)
    return (f"| {budget_text(r)} | {r['steps']} "
            f"| {r['train_seconds'] / 60:.1f} | {statistics.mean(r['before'].values()):.2f} -> "
            f"{statistics.mean(r['after'].values()):.2f} | {sum(v <= 0.5 for v in ratio.values())}/{len(ratio)} "
            f"| L{worst} {ratio[worst]:.2f} | {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} |")


def unhalved(r: dict) -> dict[str, float]:
    """{layer: after / before} of the layers a config left above half their MSE."""
    return {k: r["after"][k] / r["before"][k] for k in r["before"] if r["after"][k] > 0.5 * r["before"][k]}


def shipped_section(records: dict[str, dict]) -> list[str]:
    """The page's section on stage 1 of the default conversion (SHIPPED)."""
    if not records:
        return []
    lines = ["## The conversion `linearize convert` makes", "",
             f"Stage 1 alone of `{SHIPPED_RECIPE}` (every layer linear, no kept softmax layer; each row "
             "names its window and state sharing as recorded), the same held-out MSE and perplexity. LoLA's sparse cache is "
             "inference-only, so neither training nor these errors include it.", "", *SUMMARY_HEADER,
             *(summary_row(r) for r in records.values()), ""]
    for name, r in records.items():
        stuck = unhalved(r)
        lines.append(f"- {budget_text(r)}: layers above half their MSE: "
                     + (", ".join(f"L{k} ({v:.2f})" for k, v in stuck.items()) or "none") + ".")
    return [*lines, ""]


def page(records: dict[str, dict]) -> str:
    head = [*SUMMARY_HEADER, *(summary_row(r) for r in records.values())]
    best_name = min(records, key=lambda n: statistics.mean(records[n]["after"].values()))
    best = records[best_name]
    stuck = unhalved(best)
    verdict = (f"Best: {best_name} ({best['steps']} steps). Layers it leaves above half their MSE: "
               + (", ".join(f"L{k} ({v:.2f})" for k, v in stuck.items()) or "none") + ".")
    layers = list(next(iter(records.values()))["before"])
    per_layer = ["| layer | before | " + " | ".join(records) + " |", "|---:|---:|" + "---:|" * len(records)]
    for k in layers:
        first = next(iter(records.values()))["before"][k]
        per_layer.append(f"| {k} | {first:.3g} | " + " | ".join(f"{r['after'][k]:.3g} ({r['after'][k] / first:.2f})"
                                                            for r in records.values()) + " |")
    return "\n".join([
        "# Does stage 1 learn?", "",
        "Written by `python scripts/stage1_rows.py` (SmolLM2-135M-Instruct, fp32, one CPU thread each). Stage 1 "
        f"alone of `{RECIPE}` (LoLCATs, init baseline, Mamba2 gate, softmax kept in layers 14, 17, 20, 23; "
        "LR 1e-2 cosine, loss = mean over layers), on the long documents' train split, at different row lengths "
        "(`stage1.seq_len`) and budgets. Before and after, each linearized layer's attention-transfer MSE "
        f"(x1000, per-head outputs, as LoLCATs publishes it) on the first {WINDOW:,} tokens of {HELDOUT_DOCS} "
        "held-out long documents (`eval_layer_mse` in the run's metrics.jsonl), and the student's own perplexity "
        "on the same tokens. Train minutes exclude the evaluations; runs shared the 2 cores with another run.", "",
        *head, "", verdict, "",
        "Per layer: the held-out MSE before stage 1, and after it (after / before) for each config.", "",
        *per_layer, ""])


def load_records(names, folder: Path) -> dict[str, dict]:
    """{name: record} for the names whose folder/<name>.json exists, in the names' order."""
    return {n: json.loads((folder / f"{n}.json").read_text()) for n in names if (folder / f"{n}.json").is_file()}


def capacity_section(records: dict[str, dict]) -> list[str]:
    """The page's section on the stuck layers trained alone with more capacity."""
    if not records:
        return []
    lines = ["## The stuck layers, with more capacity", "",
             f"Stage 1 of layers {', '.join(map(str, STUCK_LAYERS))} alone (`linearize.layers`; every layer is "
             "trained on the teacher's input, so a layer's MSE does not depend on which others are linearized), "
             f"{CAPACITY['stuck-default'].tokens:,} tokens at {CAPACITY_SEQ_LEN}-token rows unless "
             "the change says otherwise, one change at a time. Held-out MSE x1000 after / "
             "before, as above.", "",
             "| change | " + " | ".join(f"L{k}" for k in STUCK_LAYERS) + " | train min |",
             "|---|" + "---:|" * (len(STUCK_LAYERS) + 1)]
    ratio = lambda r, k: r["after"][str(k)] / r["before"][str(k)]  # noqa: E731
    for r in records.values():
        cells = [f"{r['after'][str(k)]:.3g} ({ratio(r, k):.3f})" for k in STUCK_LAYERS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['train_seconds'] / 60:.1f} |")
    joint = DATA / "rows512-64k.json"
    if "stuck-default" in records and joint.is_file():
        j = json.loads(joint.read_text())
        lines += ["", "Alone, the layers end where the joint run of every layer left them ("
                  + ", ".join(f"L{k} {ratio(records['stuck-default'], k):.2f} vs {ratio(j, k):.2f}" for k in STUCK_LAYERS)
                  + "): sharing the loss with 25 other layers did not starve them."]
    halved = [f"L{k} with {r['label']}" for r in records.values() for k in STUCK_LAYERS if ratio(r, k) <= 0.5]
    best = {k: min(records.values(), key=lambda r: ratio(r, k)) for k in STUCK_LAYERS}
    lines += ["", "Halved: " + (", ".join(halved) if halved else "none of the three, with any change tried") + "; "
              "closest: " + ", ".join(f"L{k} {ratio(r, k):.3f} ({r['label']})" for k, r in best.items()) + "."]
    return [*lines, ""]


def after_stage2() -> list[str]:
    """The page's section on the full runs (stage 1 then stage 2) that exist among AFTER_RUNS."""
    found = load_records(AFTER_RUNS, AFTER_STAGE2)
    if len(found) < 2:
        return []
    lines = ["## After stage 2", "",
             "The same recipe through stage 2 (112k tokens of LoRA at 4,096-token rows, "
             "[quality-at-length-128k.md](quality-at-length-128k.md)), scored on the 8 held-out long documents "
             "(first 4,096 tokens), the joined 1k documents and the short summaries. In the 0-64 bucket every "
             "model attends exactly as the teacher does, so a change there comes from the LoRA and the data it "
             "read, not from attention.", "",
             "| stage 1 | long docs | 0-64 | 2k-4k | joined 1k | short |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in found.items():
        b = r["long_doc"]["buckets"]
        lines.append(f"| {AFTER_RUNS[name]} | {r['long_doc']['overall']['perplexity']:.2f} | {b[0]['perplexity']:.2f} "
                     f"| {b[-1]['perplexity']:.2f} | {r['joined']['perplexity']:.2f} | {r['short']['perplexity']:.2f} |")
    base = found.get("recommended-kl4")
    if base is not None:
        better = [AFTER_RUNS[n] for n, r in found.items() if n != "recommended-kl4"
                  and r["long_doc"]["overall"]["perplexity"] < base["long_doc"]["overall"]["perplexity"]
                  and r["joined"]["perplexity"] < base["joined"]["perplexity"]]
        lines += ["", "Better than the shipped 4-step stage 1 on both the long and the joined documents: "
                  + ("; ".join(better) if better else "none (the recipes keep their stage 1)") + "."]
    return [*lines, ""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *CAPACITY, *SHIPPED],
                   help=f"default: the row configs; the capacity ones ({', '.join(CAPACITY)}) and the "
                        f"shipped conversion's ({', '.join(SHIPPED)}) on request")
    p.add_argument("--work", type=Path, default=Path("outputs/stage1-rows"))
    p.add_argument("--render", action="store_true", help="only rewrite the page from its records")
    p.add_argument("--heads", choices=[*CONFIGS, *CAPACITY],
                   help="instead of training, measure this trained config's MSE per head (needs its run folder)")
    args = p.parse_args(argv)
    if args.heads:
        measure_heads(args.heads, args.work)
    elif not args.render:
        for name in args.configs:
            run(name, args.work)
    records = load_records(CONFIGS, DATA)
    DOC.write_text(page(records) + "\n" + "\n".join(capacity_section(load_records(CAPACITY, DATA)) + heads_section(CAPACITY)
                                                   + after_stage2() + shipped_section(load_records(SHIPPED, DATA))))
    print(f"wrote {DOC} ({len(records)} configs)")


if __name__ == "__main__":
    main()
