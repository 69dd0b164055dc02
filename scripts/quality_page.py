"""The quality-at-length page, rendered from the runs' records: the table (perplexity by position
bucket, recall, decode state), the verdicts against window + sinks and the controls, LoLA's
effect, issue #12's and #17's targets, and the figures. `write_document` writes it."""
from __future__ import annotations

import json
from pathlib import Path

from quality_runs import (LABELS, REFERENCES, SPARSE, control_of, conversion_of, decode_state_mib,
                          is_trained, is_truncation, window_of)

# Pages that answer a narrower question than "quality at length" say which in their title.
TITLES = {"quality-at-length-recurrences": "Quality at length: the other recurrences (issue #17) beside Liger-GLA",
          "quality-at-length-208k": "Quality at length: the 4-layer hybrid trained on the whole train split"}


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _long(record: dict) -> float:
    return record["long_doc"]["overall"]["perplexity"]


def _passkey_rates(record: dict) -> list[float]:
    """Passkey accuracy (%) per length, over its depths and trials."""
    return [sum(a) / len(a) for a in record["passkey"]["accuracy"]]


def _ppl(x: dict | None) -> str:
    return "" if x is None else f"{x['perplexity']:.2f}"


def _mib(name: str) -> str:
    mib = decode_state_mib(name)
    return "" if mib is None else f"{mib:.1f} MiB"


def _acc(x) -> str:
    return "" if x is None else f"{x:.0f}"


def conversion_label(conversion: dict) -> str:
    """A conversion's fields as the page prints them: 'method lolcats, init baseline, ...'."""
    return ", ".join(f"{k} {v}" for k, v in conversion.items())


def rows(results: dict) -> list[str]:
    """Markdown rows: perplexities by position bucket, then recall, per run."""
    teacher = results.get("teacher", {}).get("long_doc")
    base = results.get("window-sinks", {}).get("long_doc")
    head = ["| run | 0-64 | 64-512 | 512-2k | 2k-4k | long docs | vs teacher | vs window+sinks | joined 1k docs "
            "| short | passkey 2k / 4k % | MQAR 2k / 4k % | decode state @ 16k |", "|---|" + "---:|" * 12]
    out = list(head)
    for name, res in results.items():
        ld = res.get("long_doc")
        buckets = [_ppl(b) for b in ld["buckets"]] if ld else [""] * 4
        overall = ld["overall"] if ld else None
        vs_t = f"{overall['perplexity'] / teacher['overall']['perplexity']:.3f}x" if ld and teacher else ""
        vs_b = f"{overall['perplexity'] / base['overall']['perplexity']:.3f}x" if ld and base else ""
        pk = res.get("passkey")
        pk_s = " / ".join(_acc(sum(r) / len(r)) for r in pk["accuracy"]) if pk else ""
        mq = res.get("mqar")
        mq_s = " / ".join(_acc(m["mean_accuracy"]) for m in mq) if mq else ""
        out.append(f"| {LABELS.get(name, name)} | " + " | ".join(buckets) + f" | {_ppl(overall)} | {vs_t} | {vs_b} | "
                   f"{_ppl(res.get('joined'))} | {_ppl(res.get('short'))} | {pk_s} | {mq_s} | {_mib(name)} |")
    return out


def _untrained_twin(source: str, results: dict) -> dict | None:
    """The measured plain truncation an untrained init-baseline conversion computes exactly (the
    same window, no kept layers), to set LoLA beside when the conversion itself was not run."""
    conversion = conversion_of(source) or {}
    if is_trained(source) or conversion.get("init") != "baseline" or conversion.get("softmax_layers"):
        return None
    twins = [r for r in REFERENCES if r in results and not is_trained(r) and is_truncation(r)
             and window_of(r) == window_of(source)]
    return results[twins[0]] if twins else None


def passkey_command(record: dict, name: str) -> str:
    """The command that remakes a 3-trial passkey record: an untrained record sets the fields in
    which its conversion differs from today's recommended one (a field the recommended one did
    not set when the record was made had LinearizeConfig's default)."""
    import dataclasses

    from linearize.config import RECOMMENDED, LinearizeConfig

    if record["model"] != "recommended conversion":
        flags = f"--sparse-cache {record['sparse_cache']}"
        if record.get("sparse_block") is not None:
            flags += f" --sparse-block {record['sparse_block']}"
        if record.get("sparse_per_kv_head") is not None:
            flags += " --sparse-per-kv-head" if record["sparse_per_kv_head"] else " --no-sparse-per-kv-head"
        return f"python scripts/passkey_recommended.py --model {record['model']} {flags} --name {name}"
    then = {f.name: f.default for f in dataclasses.fields(LinearizeConfig) if f.name in RECOMMENDED}
    sets = sorted(f"{k}={v}" for k, v in {**then, **record["conversion"]}.items() if RECOMMENDED.get(k) != v)
    return "python scripts/passkey_recommended.py" + (" --set " + " ".join(sets) if sets else "") + f" --name {name}"


def sparse_cache_section(results: dict, doc_dir: Path, work: Path) -> list[str]:
    """What LoLA's sparse cache adds to the model it is set on, per entry with numbers, and the
    3-trial passkey records of this page's runs (their models under `work`) and of the
    untrained recommended conversion."""
    from linearize.sparse_cache import pairs_kept_per

    lines = []
    for name, entry in SPARSE.items():
        res, ref = results.get(name), results.get(entry.source) or _untrained_twin(entry.source, results)
        if not res or not ref:
            continue
        parts = []
        for key, label in (("long_doc", "long documents"), ("joined", "joined 1k documents"), ("short", "short text")):
            a = res.get(key, {}).get("overall", res.get(key)) if key == "long_doc" else res.get(key)
            b = ref.get(key, {}).get("overall", ref.get(key)) if key == "long_doc" else ref.get(key)
            if a and b:
                parts.append(f"{label} {b['perplexity']:.2f} -> {a['perplexity']:.2f}")
        for key, label in (("passkey", "passkey 2k / 4k"),):
            if key in res and key in ref:
                fmt = lambda r: " / ".join(f"{sum(x) / len(x):.0f}" for x in r["accuracy"])  # noqa: E731
                parts.append(f"{label} {fmt(ref[key])} -> {fmt(res[key])} %")
        if "mqar" in res and "mqar" in ref:
            fmt = lambda r: " / ".join(f"{m['mean_accuracy']:.0f}" for m in r)  # noqa: E731
            parts.append(f"MQAR 2k / 4k {fmt(ref['mqar'])} -> {fmt(res['mqar'])} %")
        lines.append(f"- {LABELS.get(name, name)}: " + "; ".join(parts) + ".")
    for trials in sorted((doc_dir / "data" / "passkey-3trials").glob("*.json")):
        record = json.loads(trials.read_text())
        if record["model"] != "recommended conversion" and Path(record["model"]).parts[:2] != Path(work).parts[:2]:
            continue
        pk = record["passkey"]
        per = " / ".join(f"{sum(a) / len(a):.0f}" for a in pk["accuracy"])
        untrained = record["model"] == "recommended conversion"
        what = (f"the recommended conversion untrained ({conversion_label(record['conversion'])})" if untrained
                else f"`{record['model']}` with LoLA {record['sparse_cache']} "
                     f"{pairs_kept_per(bool(record.get('sparse_per_kv_head')))}")
        lines.append(f"- {pk['trials']} trials per depth (12 needles per length, `{passkey_command(record, trials.stem)}`"
                     f"): {what} retrieves {per} % at 2k / 4k.")
    if not lines:
        return []
    return ["## LoLA's sparse cache (it needs no training)", "",
            "`--sparse-cache N` keeps, of the keys that leave the 64-token window, the N per layer and head that the "
            "recurrent state reproduces worst exact beside the window (selected every 64 tokens); the others enter "
            "the state. It changes no weight: each line below is the same model without and with it. With init "
            "baseline and no training the linear branch weighs 0, so there the state only chooses which pairs "
            "stay exact: that model is window + sinks + N selected pairs per head, at constant decode memory.", "",
            *lines, ""]


def verdicts(results: dict) -> list[str]:
    """One line per trained run: does it beat window + sinks, and the same LoRA budget on
    window + sinks (the control), on the long and the joined documents; per position bucket,
    where it beats the control; its ratio to the teacher."""
    base, teacher = results.get("window-sinks"), results.get("teacher")
    if not base or not teacher:
        return []
    word = lambda ok: "beats" if ok else "does NOT beat"  # noqa: E731
    lines = []
    for name, res in results.items():
        if name in REFERENCES or not is_trained(name) or "long_doc" not in res or "joined" not in res:
            continue
        ref = control_of(name, measured=results)
        control = results.get(ref or "window-sinks-lora")
        ld, jd = res["long_doc"]["overall"]["perplexity"], res["joined"]["perplexity"]
        line = (f"- {LABELS.get(name, name)}: {word(ld < base['long_doc']['overall']['perplexity'])} window + sinks "
                f"on the long documents ({ld:.2f} vs {base['long_doc']['overall']['perplexity']:.2f}) and "
                f"{word(jd < base['joined']['perplexity'])} it on the joined 1k documents ({jd:.2f} vs "
                f"{base['joined']['perplexity']:.2f}); {ld / teacher['long_doc']['overall']['perplexity']:.3f}x the "
                "teacher's long-document perplexity.")
        if control and "long_doc" in control and "joined" in control:
            c_ld, c_jd = control["long_doc"]["overall"]["perplexity"], control["joined"]["perplexity"]
            wins = [f"{b['start']}-{b['end']}" for b, c in zip(res["long_doc"]["buckets"], control["long_doc"]["buckets"])
                    if b["perplexity"] < c["perplexity"]]
            where = f"in the position buckets {', '.join(wins)}" if wins else "in no position bucket"
            if ref is None:
                what = "the control, which lacks its kept softmax layers"
            elif conversion_of(ref).get("softmax_layers"):
                what = "the same kept layers over window + sinks"
            else:
                what = "the control"
            aside = "same LoRA, no recurrence"
            own_w, control_w = window_of(name), window_of(ref or "window-sinks-lora")
            if own_w and control_w and own_w != control_w:
                aside = f"window {control_w} where this run's is {own_w}, so part of the gap is the window; {aside}"
            line += (f" Against {what} ({aside}) it {word(ld < c_ld)} it on the long documents "
                     f"({c_ld:.2f}) and {word(jd < c_jd)} it on the joined documents ({c_jd:.2f}); it is better "
                     f"{where}.")
        lines.append(line)
    return lines


# A truncation row counts as "the same memory" up to this multiple of a run's decode state.
MEMORY_SLACK = 1.1


def equal_memory(results: dict) -> list[str]:
    """Each run against plain truncation at its own memory: the best long-document perplexity
    among the measured truncation rows whose decode state at 16k is at most MEMORY_SLACK x the
    run's (an untrained run only against untrained ones), and whether the run beats it."""
    cuts = {n: (r, decode_state_mib(n)) for n, r in results.items() if is_truncation(n) and "long_doc" in r}
    if len(cuts) < 2:
        return []
    word = lambda ok: "beats" if ok else "does NOT beat"  # noqa: E731
    lines, wins, total = [], 0, 0
    for name, res in results.items():
        mib = decode_state_mib(name)
        if name in REFERENCES or "long_doc" not in res or mib is None:
            continue
        fair = {n: c for n, c in cuts.items() if c[1] <= MEMORY_SLACK * mib and (is_trained(name) or not is_trained(n))}
        if not fair:
            continue
        best = min(fair, key=lambda n: _long(fair[n][0]))
        won = _long(res) < _long(fair[best][0])
        wins, total = wins + won, total + 1
        lines.append(f"- {LABELS.get(name, name)} ({mib:.1f} MiB): {_long(res):.2f}; {word(won)} "
                     f"{LABELS.get(best, best)} ({fair[best][1]:.1f} MiB, {_long(fair[best][0]):.2f})"
                     + (_with_more_memory(name, res, cuts, mib) if won else "") + ".")
    sizes = ", ".join(str(w) for w in sorted({window_of(n) for n in cuts}))
    head = ["## At no more memory: the run or a plain window?", "",
            "A recurrence costs decode memory that a longer softmax window could use instead. Each run beside the "
            "best plain truncation (window + sinks; with the same LoRA, or untrained) whose decode state at 16k is "
            f"at most {MEMORY_SLACK}x the run's, on the long documents: {wins} of {total} runs beat it. Only the "
            f"truncation rows measured here are candidates (windows {sizes}), so a run far above the largest "
            "one's memory is compared with a window that holds less than it does; a run that beats its window is also "
            "set beside the cheapest window with more memory that beats it in turn, or else the best such window it "
            "beats too. This is perplexity only: no plain "
            "window recalls anything from beyond itself (the passkey column).", ""]
    return head + lines + [""]


def _with_more_memory(name: str, res: dict, cuts: dict, mib: float) -> str:
    """For a run that beats its affordable truncation: the cheapest measured truncation with more
    memory that beats the run in turn, or else the best one the run beats too ('' if none)."""
    larger = {n: c for n, c in cuts.items() if c[1] > MEMORY_SLACK * mib and (is_trained(name) or not is_trained(n))}
    better = [n for n in larger if _long(larger[n][0]) <= _long(res)]
    if better:
        n = min(better, key=lambda n: larger[n][1])
        return f", but {LABELS.get(n, n)}, with more memory ({larger[n][1]:.1f} MiB), beats it ({_long(larger[n][0]):.2f})"
    if larger:
        n = min(larger, key=lambda n: _long(larger[n][0]))
        return f", and {LABELS.get(n, n)} too, with more memory ({larger[n][1]:.1f} MiB, {_long(larger[n][0]):.2f})"
    return ""


def domain_note(results: dict) -> list[str]:
    """What the first position bucket says about the ratios to the teacher: there every model
    computes the teacher's attention exactly, so a trained run below the teacher measures its
    LoRA's fit to the documents' domain, which flatters every trained run's ratio."""
    teacher = results.get("teacher", {}).get("long_doc")
    trained = [(n, r["long_doc"]["buckets"][0]["perplexity"]) for n, r in results.items()
               if "train_seconds" in r and "long_doc" in r]
    if not teacher or not trained:
        return []
    first = teacher["buckets"][0]
    low, high = min(p for _, p in trained), max(p for _, p in trained)
    return [f"In the first bucket ({first['start']}-{first['end']}) every model attends exactly as the teacher "
            f"does (the window covers it), yet the trained runs score "
            + (f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}") + " against the teacher's "
            f"{first['perplexity']:.2f}: their LoRA also fitted the documents' domain, which flatters every "
            "trained run's ratio to the teacher. The fair test of the recurrence is the control: the same LoRA "
            "on window + sinks, no recurrence"
            + (" (its row above)." if "window-sinks-lora" in results else " (not measured on this page).")
            + ceiling_sentence(results), ""]


def ceiling_sentence(results: dict) -> str:
    """The trained runs measured against the teacher with the same LoRA, where it was run."""
    ceiling = results.get("teacher-lora", {}).get("long_doc")
    if not ceiling:
        return " The teacher with the same LoRA (the fair ceiling) is not measured on this page."
    ref = ceiling["overall"]["perplexity"]
    ratios = [f"{LABELS.get(n, n)} {r['long_doc']['overall']['perplexity'] / ref:.3f}x"
              for n, r in results.items() if n not in REFERENCES and "long_doc" in r and is_trained(n)]
    return (f" The teacher with the same LoRA (the fair ceiling) scores {ref:.2f} on the long documents; against it: "
            + "; ".join(ratios) + ".")


def targets(results: dict, args) -> list[str]:
    """Issue #12's targets, each met or NOT met with the numbers behind it."""
    base, teacher = results.get("window-sinks"), results.get("teacher")
    trained = {n: r for n, r in results.items() if n not in REFERENCES
               and is_trained(n) and "long_doc" in r and "joined" in r}
    if not base or not teacher or not trained:
        return []
    ld, met, per_length = _long, _met, _passkey_rates
    losers = [n for n, r in trained.items() if ld(r) >= ld(base) or r["joined"]["perplexity"] >= base["joined"]["perplexity"]]
    best = min(trained, key=lambda n: ld(trained[n]))
    ratio = ld(trained[best]) / ld(teacher)
    keys = [(n, per_length(r)) for n, r in results.items() if n not in REFERENCES and "passkey" in r]
    budget = args.stage1_tokens + args.stage2_tokens
    out = [f"- Every trained run beats window + sinks on the long and the joined documents after <= 256k tokens "
           f"(here {budget // 1024}k): {met(not losers)}" + (f"; not beating it: {'; '.join(LABELS.get(n, n) for n in losers)}."
                                                             if losers else "."),
           f"- Best long-document perplexity <= 1.10x the teacher's (first milestone): "
           f"{met(ratio <= 1.10)}, {LABELS.get(best, best)} at {ratio:.3f}x"
           + (f" ({ld(trained[best]) / ld(results['teacher-lora']):.3f}x the teacher + the same LoRA)."
              if "long_doc" in results.get("teacher-lora", {}) else "."),
           f"- The same <= 1.05x after <= 1M tokens (here {budget // 1024}k): "
           + (f"{met(ratio <= 1.05)}." if budget <= 1 << 20 else "not judged (the budget is above 1M tokens).")]
    if keys:
        n, acc = max(keys, key=lambda x: (min(x[1]), sum(x[1])))
        shown = " / ".join(f"{a:.0f}" for a in acc)
        out.append(f"- Passkey at 2k and 4k beyond the window >= 60 % at each length: {met(min(acc) >= 60)}, best "
                   f"{shown} % ({LABELS.get(n, n)}; teacher "
                   f"{' / '.join(f'{a:.0f}' for a in per_length(teacher))} %, window + sinks 0 % by construction).")
    return out


def recurrence_targets(results: dict) -> list[str]:
    """Issue #17's targets on a page that holds its runs beside Liger-GLA at the same budget:
    the delta rule's recall (MQAR at least 5 points above at both lengths, passkey no lower) and
    Lightning's and Based's long-document perplexity (no worse than Liger-GLA's)."""
    gla = results.get("liger-gla-baseline")
    if not gla or "long_doc" not in gla:
        return []
    met, passkey, ld = _met, _passkey_rates, _long
    mqar = lambda r: [m["mean_accuracy"] for m in r["mqar"]]  # noqa: E731
    shown = lambda xs: " / ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    out = []
    delta = results.get("gated-deltanet-baseline")
    if delta and "mqar" in delta and "passkey" in delta:
        ok = (all(d >= g + 5 for d, g in zip(mqar(delta), mqar(gla)))
              and all(d >= g for d, g in zip(passkey(delta), passkey(gla))))
        out.append(f"- Gated delta rule: recall beyond the window clearly above Liger-GLA (MQAR >= 5 points higher "
                   f"at 2k and 4k, passkey no lower): {met(ok)}; MQAR {shown(mqar(delta))} vs {shown(mqar(gla))} %, "
                   f"passkey {shown(passkey(delta))} vs {shown(passkey(gla))} %; long documents {ld(delta):.2f} vs "
                   f"{ld(gla):.2f}.")
    for name in ("lightning-baseline", "based-baseline"):
        res = results.get(name)
        if res and "long_doc" in res:
            out.append(f"- {LABELS[name]}: long documents no worse than Liger-GLA at the same budget: "
                       f"{met(ld(res) <= ld(gla))}, {ld(res):.2f} vs {ld(gla):.2f} (joined 1k "
                       f"{res['joined']['perplexity']:.2f} vs {gla['joined']['perplexity']:.2f}).")
    return ["## Targets (issue #17: the other recurrences against Liger-GLA)", "", *out, ""] if out else []


def curves(results: dict, path: Path) -> bool:
    """Held-out perplexity vs stage-2 tokens per trained run; teacher and window + sinks as
    horizontal lines (same 16 texts, 1,024-token windows). False when nothing to draw."""
    from linearize.plots import ROLE_STYLE, new_figure, save_figure

    fig, (ax,) = new_figure(1, width=7, height=4)
    drawn = False
    for name, res in results.items():
        pts = res.get("curve")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS.get(name, name))
            drawn = True
    for name, color in (("teacher", ROLE_STYLE["teacher"]["color"]), ("window-sinks", "tab:red")):
        ref = results.get(name, {}).get("curve_ref")
        if ref:
            ax.axhline(ref["perplexity"], color=color, linestyle="--", label=LABELS[name])
    ax.set_xlabel("stage-2 tokens")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (16 summaries, 1k windows)")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
    return drawn


def buckets_figure(results: dict, path: Path) -> bool:
    """Long-document perplexity by target-position bucket, one line per run: where each
    method loses to the teacher. False when no run has long-document numbers."""
    from linearize.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, width=7, height=4)
    drawn = False
    for name, res in results.items():
        ld = res.get("long_doc")
        if not ld:
            continue
        labels = [f"{b['start']}-{b['end']}" for b in ld["buckets"]]
        style = dict(color="k", linestyle="--") if name == "teacher" else {}
        ax.plot(labels, [b["perplexity"] for b in ld["buckets"]], marker="o", label=LABELS.get(name, name), **style)
        drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("target position in the document (tokens)")
    ax.set_ylabel("perplexity, 8 held-out long documents")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
    return drawn


def write_document(results: dict, args) -> Path:
    img = args.doc.parent / "img" / f"{args.doc.stem}-curves.png"
    has_curves = curves(results, img)
    buckets_img = args.doc.parent / "img" / f"{args.doc.stem}-buckets.png"
    has_buckets = buckets_figure(results, buckets_img)
    budget = []
    for name, res in results.items():
        if "train_seconds" in res:
            checkpointed = " (gradient checkpointing)" if res.get("gradient_checkpointing") else ""
            own = f", trained on {res['budget']}" if "budget" in res else ""
            budget.append(f"{LABELS.get(name, name)} {res['train_seconds'] / 60:.0f} min{checkpointed}{own}")
    text = [
        f"# {TITLES.get(args.doc.stem, 'Quality at length')}",
        "",
        f"Written by `python scripts/quality_at_length.py --work {args.work} --doc {args.doc} --seq-len {args.seq_len} "
        f"--stage1-tokens {args.stage1_tokens} --stage2-tokens {args.stage2_tokens}` (SmolLM2-135M-Instruct, fp32, "
        "this project's 2-core CPU machine; `--runs NAME ...` picks entries, finished steps are reused). "
        "Each trained run distills at "
        f"{args.seq_len}-token packed rows of the long documents' train split (stage 1 {args.stage1_tokens:,} "
        f"tokens where the method has new parameters, LR 1e-2, mean over layers; stage 2 {args.stage2_tokens:,} "
        "tokens of LoRA r=8 on q/k/v, LR 1e-3, cross-entropy; with `init=baseline` the new parameters train in "
        "stage 2 too). Nothing here was trained on the held-out text. Training time: "
        + (", ".join(budget) or "none") + ".",
        "",
        "Columns: perplexity by target position over the first 4,096 tokens of the 8 held-out long documents "
        "(`linearize eval --metrics long-doc`), their overall perplexity and its ratio to the teacher and to "
        "window + sinks; the held-out summaries joined into 1,024-token documents (48 texts); the short held-out "
        "summaries (64 texts); passkey (4 depths, 1 trial each) and MQAR (16 pairs, 8 samples) at 2k and 4k "
        "tokens with every key at least 256 tokens before its question (beyond every window here); one "
        "sequence's decode state at 16k tokens (recurrent states, windows, LoLA pairs and the KV cache of any "
        "softmax layer; the teacher's KV cache).",
        "",
        *rows(results),
        "",
        *([f"![perplexity by position](img/{buckets_img.name})", ""] if has_buckets else []),
        "## Does training beat just truncating attention?",
        "",
        *(verdicts(results) or ["(needs the teacher, window + sinks and a trained run)"]),
        "",
        *domain_note(results),
        *equal_memory(results),
        *sparse_cache_section(results, args.doc.parent, args.work),
        "## Targets (issue #12)",
        "",
        *(targets(results, args) or ["(needs the teacher, window + sinks and a trained run)"]),
        "",
        *recurrence_targets(results),
    ]
    if has_curves:
        text += ["## Quality vs budget", "", f"![held-out perplexity vs tokens](img/{img.name})", ""]
    args.doc.write_text("\n".join(text))
    return args.doc
