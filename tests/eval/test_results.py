"""The results pipeline (scripts/results/, behind scripts/make_results.py) at toy size: every
step runs on a tiny model, the document has every section, numbers are finite, and a second run
reuses the files instead of recomputing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package

from make_results import main  # noqa: E402
from results.run import ResultsRun  # noqa: E402
from results.rows import num  # noqa: E402
from results.settings import ENTRY_BY_NAME, METHOD_ENTRIES, ResultsSettings  # noqa: E402

from linearize.kernels.tolerances import TOLERANCES  # noqa: E402


def toy_settings(model_dir, tmp_path, methods) -> ResultsSettings:
    return ResultsSettings(
        model=str(model_dir), work_dir=str(tmp_path / "work"), doc=str(tmp_path / "docs" / "results.md"),
        methods=methods, stage1_tokens=64, stage2_tokens=64, seq_len=32, gradient_accumulation_steps=1,
        ppl_texts=3, long_texts=4, long_length=96, mmlu_limit=None, passkey_lengths=[256],
        speed_length=64, decode_steps=2, prefill_lengths=[32, 64], decode_contexts=[32],
        train_lengths=[32], kernel_lengths=[64], bench_repeats=1, progress=False,
    )


def table_under(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after `heading`, header and rule rows left out."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def assert_tables_match_json(text: str, work: Path, methods: list[str]) -> None:
    """Every number of the main table and the correctness table is the one in the file it came from."""
    rows = {r[0]: r for r in table_under(text, "## Every method, same budget")}
    teacher = json.loads((work / "teacher" / "eval" / "results.json").read_text())
    t_ppl = teacher["metrics"]["perplexity"]["student"]["perplexity"]
    assert rows["teacher (softmax attention)"][2] == num(t_ppl)
    for name in methods:
        row = rows[ENTRY_BY_NAME[name].title]
        ev = json.loads((work / name / "eval" / "results.json").read_text())
        untrained = json.loads((work / name / "untrained.json").read_text())
        speed = json.loads((work / name / "speed.json").read_text())
        long = json.loads((work / name / "long_ppl.json").read_text())
        ppl = ev["metrics"]["perplexity"]["student"]["perplexity"]
        assert row[1] == num(untrained["perplexity"]["perplexity"])
        assert row[2] == num(ppl) and row[3] == f"{ppl / t_ppl:.2f}"
        assert row[4].endswith(f"→ {num(long['perplexity'])}")
        assert row[5] == num(ev["metrics"]["agreement"]["top1_agreement"], 1)
        assert row[9] == f"{speed['prefill_ratio']['speedup']:.2f}x"
        assert row[10] == f"{speed['decode_ratio']['speedup']:.2f}x"
        assert row[11] == f"{speed['decode_ratio']['cache_ratio']:.0f}x"
    bounds = {(op, backend, dtype): (float(fwd), float(grad))
              for op, backend, dtype, fwd, grad in table_under(text, "## Correctness")}
    assert bounds == {k: tuple(b) for k, b in TOLERANCES.items()}


def test_results_pipeline_toy(eval_model_dir, tmp_path):
    s = toy_settings(eval_model_dir, tmp_path, ["liger-attention", "lizard-hybrid", "window-sinks"])
    s.skip = ["speed", "bench"]
    doc = ResultsRun(s, log=lambda m: None).run()
    work = tmp_path / "work"
    assert not list(work.rglob("speed.json")) and not (work / "bench").exists()
    assert "| — | — | — |" in doc.read_text()  # speed columns not measured yet
    trained = {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if p.name != "settings.json"}
    s.skip = []
    doc = ResultsRun(s, log=lambda m: None).run()
    assert all(p.stat().st_mtime_ns == t for p, t in trained.items())  # only the skipped steps ran
    text = doc.read_text()
    for needle in ("# Results", "## Every method, same budget", "## Targets", "## Prefill", "## Decode",
                   "## Training throughput", "## CPU kernels", "teacher (softmax attention)",
                   "window + sinks", "inter-layer hybrid", "python scripts/make_results.py",
                   "Training runs", "within 10 %", "## GPU kernels", "no GPU", "## Correctness"):
        assert needle in text, needle
    for png in ("training_curves.png", "prefill.png", "decode.png", "train.png", "kernels.png"):
        assert (doc.parent / "img" / "results" / png).is_file(), png
    # the hybrid keeps softmax attention in the first and middle layers of the 2-layer model
    assert json.loads((work / "lizard-hybrid" / "run" / "final" / "config.json").read_text())[
        "linearize"]["softmax_layers"] == [0, 1]
    for name in s.methods:
        ev = json.loads((work / name / "eval" / "results.json").read_text())
        ppl = ev["metrics"]["perplexity"]["student"]["perplexity"]
        assert math.isfinite(ppl) and ppl > 1
        speed = json.loads((work / name / "speed.json").read_text())
        assert speed["prefill_ratio"]["speedup"] > 0 and speed["decode_ratio"]["cache_ratio"] > 0
    assert not (work / "window-sinks" / "run").exists()  # the baseline is never trained
    assert_tables_match_json(text, work, s.methods)

    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if p.name != "settings.json"}
    ResultsRun(s, log=lambda m: None).run()
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after  # every step reused its files

    # a finished distill run listed as a longer run: evaluated, tabled, its recipe copied next to the doc
    s.extra_runs = [str(work / "lizard-hybrid" / "run")]
    text = ResultsRun(s, log=lambda m: None).run().read_text()
    assert "## Longer training runs" in text and "[run](recipes/run.yaml)" in text
    assert (doc.parent / "recipes" / "run.yaml").is_file()
    assert (work / "extra-run" / "eval" / "results.json").is_file()
    assert "--extra-runs" in text


def test_results_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method entry nope; choose from"):
        ResultsSettings(methods=["nope"]).check()
    with pytest.raises(ValueError, match="train cannot be skipped"):
        ResultsSettings(skip=["train"]).check()
    with pytest.raises(ValueError, match="stage2_tokens must be >= 1"):
        ResultsSettings(stage2_tokens=0).check()
    assert main(["--speed-length", "0", "--work-dir", str(tmp_path)]) == 2
    assert "speed_length must be >= 1" in capsys.readouterr().err
    assert main(["--extra-runs", str(tmp_path), "--work-dir", str(tmp_path)]) == 2
    assert "has no final/config.json" in capsys.readouterr().err


def test_every_entry_is_a_valid_conversion():
    from linearize import LinearizeConfig

    for entry in METHOD_ENTRIES:
        LinearizeConfig.from_dict(entry.resolved_config(30)).resolved()


def test_missed_target_notes_name_this_run():
    """The notes on missed targets take the model's shape and the training speed from this run's files."""
    from results.targets import missed_target_notes

    rows = [{"name": "teacher", "ppl": 10.0}, {"name": "x", "ppl": 20.0, "ppl_ratio": 2.0, "trained": True,
                                                "training": {"stages": {"2": {"tokens": 3000, "seconds": 10.0}}}}]
    bench = {"prefill": {"targets": [{"met": False}], "rows": [],
                         "model": {"name": "/m/Tiny-7", "hidden_size": 96, "layers": 3}}}
    text = "\n".join(missed_target_notes(rows, bench))
    assert "3,000 tokens at most at 300 training tokens/s here" in text
    assert "on Tiny-7 (96 hidden, 3 layers)" in text and "576" not in text


def test_baseline_note_and_bench_lines_come_from_the_preset_and_the_reports():
    from linearize.config import METHOD_DEFAULTS
    from results.render import bench_description
    from results.targets import missed_target_notes

    rows = [{"name": "teacher", "ppl": 10.0}, {"name": "window-sinks", "ppl": 11.0},
            {"name": "x", "ppl": 12.0, "ppl_ratio": 1.2, "trained": True, "training": None, "tokens": 10}]
    preset = METHOD_DEFAULTS["window-sinks"]
    text = "\n".join(missed_target_notes(rows, {}))
    assert f"over the last {preset.window} tokens and {preset.num_sink_tokens} sinks" in text
    decode = {"settings": {"steps": 7}, "model": {"linearize": {"method": "lizard", "window": 128}}}
    assert bench_description("decode", decode).startswith("lizard conversion (window 128): per-token time (median "
                                                           "of 7 steps)")
    kernels = {"settings": {"heads": 6, "kv_heads": 2, "dim": 32, "batch": 1, "dtype": "float32"}}
    assert "(H=6, HKV=2, D=32, B=1, float32)" in bench_description("kernels", kernels)


def test_prefill_bound_from_teacher_rows():
    from results.targets import prefill_bound

    rows = [{"role": "teacher", "length": 1024, "tokens_per_s": 512.0, "ms": 2000.0},
            {"role": "student", "length": 1024, "tokens_per_s": 500.0, "ms": 2048.0},
            {"role": "teacher", "length": 16384, "tokens_per_s": 160.0, "ms": 96000.0}]
    text = prefill_bound(rows)
    assert "~32 s of the teacher's 96 s" in text and "~3.0x" in text
    assert prefill_bound(rows[:2]) == ""  # one length: no bound


def test_kernels_contrast_per_thread_count():
    from results.targets import kernels_contrast

    rows = [{"threads": n, "op": op, "T": T, "speedup": x}
            for n, op, T, x in ((1, "gla", 4096, 8.6), (1, "gla_scalar", 4096, 12.2), (2, "gla", 4096, 17.3),
                                (2, "gla_scalar", 4096, 22.3), (2, "gla", 1024, 99.0))]
    text = kernels_contrast(rows)
    assert "8.6x per-channel vs 12.2x per-head on 1 thread; 17.3x per-channel vs 22.3x per-head on 2 threads" in text
    assert kernels_contrast([r for r in rows if r["T"] == 1024]) == ""


def _quality_record(long_ppl: float, joined: float, passkey: list[list[float]] | None = None) -> dict:
    record = {"long_doc": {"overall": {"perplexity": long_ppl}}, "joined": {"perplexity": joined},
              "short": {"perplexity": 15.0}}
    if passkey is not None:
        record["passkey"] = {"accuracy": passkey}
    return record


def test_quality_section_reads_every_page_record(tmp_path, monkeypatch):
    """The results document's quality table: one row per trained record of each page, ratios to
    the teacher and window + sinks computed from the records, the budget from the page's command,
    untrained references (a longer plain window too) marked untrained, other untrained entries and
    pages without records left out."""
    import results.quality as quality

    monkeypatch.setattr(quality, "decode_state_mib", lambda name: {"teacher": 720.0}.get(name, 48.25))
    data = tmp_path / "data" / "quality-at-length-128k"
    data.mkdir(parents=True)
    (tmp_path / "quality-at-length-128k.md").write_text(
        "Written by `python scripts/quality_at_length.py --seq-len 4096 --stage1-tokens 16384 --stage2-tokens 114688`")
    (tmp_path / "quality-at-length-rope.md").write_text("a page without records")
    records = {"teacher": _quality_record(10.0, 11.0, [[100.0] * 4, [100.0] * 4]),
               "window-sinks": _quality_record(20.0, 13.0, [[0.0] * 4, [0.0] * 4]),
               "lolcats-baseline-gate-norope": _quality_record(16.0, 12.5),
               "lolcats-baseline-gate-norope+lola64": _quality_record(13.0, 12.0, [[75.0, 75.0, 50.0, 100.0], [100.0] * 4]),
               "lolcats-baseline-gate-norope-untrained+lola64": _quality_record(17.0, 12.7),
               "teacher-lora": _quality_record(9.0, 10.5),
               "window-sinks-w512": _quality_record(12.5, 11.7, [[0.0] * 4, [0.0] * 4]),
               "recommended-w512-shared-untrained+lola64kv": _quality_record(12.2, 11.6, [[50.0] * 4, [100.0] * 4])}
    for name, record in records.items():
        (data / f"{name}.json").write_text(json.dumps(record))
    text = "\n".join(quality.quality_section(tmp_path))
    rows = table_under(text, "## Quality at length")
    order = ["teacher", "window-sinks", "window-sinks-w512", "recommended-w512-shared-untrained+lola64kv", "teacher-lora",
             "lolcats-baseline-gate-norope", "lolcats-baseline-gate-norope+lola64"]
    assert [r[0] for r in rows] == [quality.LABELS[n] for n in order]  # the default, untrained, beside the references
    assert rows[2][1] == rows[3][1] == "[untrained](quality-at-length-128k.md)"
    best = rows[6]
    assert best[1] == "[128k tokens, 4,096-token rows](quality-at-length-128k.md)"
    assert best[2:] == ["13.00", "1.30x", "0.65x", "12.00", "15.00", "75 / 100", "48.2 MiB"]
    assert rows[0][-1] == "720.0 MiB" and rows[5][7] == "—"
    assert ("at 1.30x the teacher's long-document perplexity, against 2.00x for window + sinks; "
            f"{quality.LABELS['window-sinks-w512']}: 1.25x with 48.2 MiB; ") in text
    assert "trained alike" not in text
    (data / "window-sinks-w1344-lora.json").write_text(json.dumps({**_quality_record(12.0, 11.5), "train_seconds": 1}))
    assert (f"; a plain window trained alike beats it: {quality.LABELS['window-sinks-w1344-lora']} (128k tokens, "
            "4,096-token rows) at 1.20x with 48.2 MiB.") in "\n".join(quality.quality_section(tmp_path))
    assert quality.quality_section(tmp_path / "elsewhere") == []
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nGenerated by ...\n\n## Every method, same budget\n\ntable\n")
    quality.refresh_quality_section(doc)
    once = doc.read_text()
    assert once.index("## Quality at length") < once.index("## Every method") and once.endswith("table\n")
    assert quality.refresh_quality_section(doc).read_text() == once


def test_recurrence_targets_compare_with_liger_gla_at_one_budget():
    """Issue #17's verdicts: the delta rule needs MQAR 5 points above Liger-GLA at both lengths and
    no lower passkey; Lightning and Based need no worse long-document perplexity. Pages without
    Liger-GLA say nothing."""
    import quality_page as qal

    def record(long_ppl, mqar, passkey):
        rec = _quality_record(long_ppl, 12.0, passkey)
        rec["mqar"] = [{"mean_accuracy": m} for m in mqar]
        return rec

    gla = record(18.0, [2.0, 1.0], [[0.0] * 4, [0.0] * 4])
    results = {"liger-gla-baseline": gla, "gated-deltanet-baseline": record(17.0, [9.0, 6.0], [[25.0] * 4, [0.0] * 4]),
               "lightning-baseline": record(18.5, [2.0, 2.0], [[0.0] * 4] * 2),
               "based-baseline": record(17.5, [2.0, 2.0], [[0.0] * 4] * 2)}
    text = "\n".join(qal.recurrence_targets(results))
    assert "Gated delta rule" in text and ": met; MQAR 9 / 6 vs 2 / 1 %" in text
    assert f"{qal.LABELS['lightning-baseline']}: long documents no worse than Liger-GLA at the same budget: NOT met" in text
    assert f"{qal.LABELS['based-baseline']}: long documents no worse than Liger-GLA at the same budget: met" in text
    results["gated-deltanet-baseline"] = record(17.0, [9.0, 4.0], [[25.0] * 4, [0.0] * 4])
    assert "Liger-GLA (MQAR >= 5 points higher at 2k and 4k, passkey no lower): NOT met" in "\n".join(
        qal.recurrence_targets(results))
    assert qal.recurrence_targets({"gated-deltanet-baseline": gla}) == []


def test_control_matches_kept_layers_and_window():
    """A run's control is the LoRA-on-window-sinks reference with its softmax layers and, where one
    was measured, its window; the teacher + LoRA (a window past every length) is never a control."""
    import quality_runs as qr

    assert qr.control_of("lizard-baseline") == "window-sinks-w128-lora"
    assert qr.control_of("lizard-baseline", measured={"window-sinks-lora"}) == "window-sinks-lora"
    assert qr.control_of("recommended-kl4+lola64") == "window-sinks-kl4-lora"
    assert qr.control_of("recommended-kl2") is None
    assert qr.control_of("liger-gla-baseline") == "window-sinks-lora"
    assert not qr.is_control("teacher-lora") and not qr.is_control("window-sinks")


def test_equal_memory_compares_each_run_with_the_best_window_it_could_afford(monkeypatch):
    """Each run beside the best truncation row within 1.1x its decode state: a trained run against
    trained and untrained windows, an untrained run only against untrained ones; runs smaller than
    every window, and the references themselves, get no line."""
    import quality_page as qal

    mib = {"window-sinks": 2.9, "window-sinks-lora": 2.9, "window-sinks-w128-lora": 5.8, "window-sinks-w512": 22.7,
           "lolcats-baseline": 21.4, "recommended-kl1-untrained": 10.0, "liger-gla-baseline": 2.0}
    monkeypatch.setattr(qal, "decode_state_mib", mib.get)
    results = {"window-sinks": _quality_record(19.8, 13.1), "window-sinks-lora": _quality_record(17.4, 12.8),
               "window-sinks-w128-lora": _quality_record(14.9, 12.0), "window-sinks-w512": _quality_record(13.0, 12.0),
               "lolcats-baseline": _quality_record(14.0, 12.4), "recommended-kl1-untrained": _quality_record(18.0, 12.9),
               "liger-gla-baseline": _quality_record(17.0, 12.7)}
    text = "\n".join(qal.equal_memory(results))
    assert "1 of 2 runs beat it" in text and "windows 64, 128, 512" in text
    assert f"{qal.LABELS['lolcats-baseline']} (21.4 MiB): 14.00; does NOT beat {qal.LABELS['window-sinks-w512']}" in text
    assert f"(10.0 MiB): 18.00; beats {qal.LABELS['window-sinks']} (2.9 MiB, 19.80)" in text  # not the trained windows
    assert "liger" not in text.lower() and text.count("\n- ") == 2
    # a run that beats its affordable window is set beside the windows with more memory too
    mib.update({"window-sinks-w1344-lora": 59.2, "recommended-w512+lola64": 51.7})
    results.update({"window-sinks-w1344-lora": _quality_record(11.0, 11.0), "recommended-w512+lola64": _quality_record(11.4, 11.1)})
    text = "\n".join(qal.equal_memory(results))
    assert (f"{qal.LABELS['recommended-w512+lola64']} (51.7 MiB): 11.40; beats {qal.LABELS['window-sinks-w512']} (22.7 MiB, "
            f"13.00), but {qal.LABELS['window-sinks-w1344-lora']}, with more memory (59.2 MiB), beats it (11.00).") in text
    results["window-sinks-w1344-lora"] = _quality_record(11.5, 11.0)
    assert "and window 1344 + 4 sinks + the same LoRA (more decode state than the default; control) too, with more " \
           "memory (59.2 MiB, 11.50)." in "\n".join(qal.equal_memory(results))
    assert qal.equal_memory({"window-sinks": results["window-sinks"], "lolcats-baseline": results["lolcats-baseline"]}) == []


def test_lola_on_an_untrained_conversion_is_set_beside_its_own_window():
    """An untrained init-baseline conversion computes window + sinks at its own window, so LoLA on it
    is compared with that truncation; a kept layer or the paper's init has no such twin."""
    import quality_page as qal

    results = {"window-sinks": _quality_record(19.8, 13.1), "window-sinks-w512": _quality_record(12.7, 11.7)}
    assert qal._untrained_twin("recommended-w512-untrained", results) is results["window-sinks-w512"]
    assert qal._untrained_twin("lolcats-baseline-untrained", results) is results["window-sinks"]
    assert qal._untrained_twin("recommended-kl1-untrained", results) is None
    assert qal._untrained_twin("lolcats-paper-untrained", results) is None
    assert qal._untrained_twin("recommended-w512-untrained", {"window-sinks": results["window-sinks"]}) is None


def test_passkey_command_remakes_the_record_under_todays_default():
    """An untrained record's command sets the fields where its conversion differs from today's
    recommended one; a model record's command loads its folder."""
    import quality_page as qal
    from linearize.config import RECOMMENDED

    same = {"model": "recommended conversion", "conversion": dict(RECOMMENDED)}
    assert qal.passkey_command(same, "r") == "python scripts/passkey_recommended.py --name r"
    older = {"model": "recommended conversion", "conversion": {**RECOMMENDED, "window": 64, "gate": "none"}}
    assert qal.passkey_command(older, "r") == "python scripts/passkey_recommended.py --set gate=none window=64 --name r"
    before_init = {"model": "recommended conversion",  # made before the recommended conversion set init
                   "conversion": {k: v for k, v in RECOMMENDED.items() if k != "init"}}
    assert qal.passkey_command(before_init, "r") == "python scripts/passkey_recommended.py --set init=None --name r"
    trained = {"model": "out/final", "sparse_cache": 64}  # made before the record kept the other sparse flags
    assert qal.passkey_command(trained, "t") == "python scripts/passkey_recommended.py --model out/final --sparse-cache 64 --name t"
    per_kv_head = {**trained, "sparse_block": 32, "sparse_per_kv_head": True}
    assert qal.passkey_command(per_kv_head, "t") == ("python scripts/passkey_recommended.py --model out/final "
                                                    "--sparse-cache 64 --sparse-block 32 --sparse-per-kv-head --name t")
    per_head = {**trained, "sparse_block": None, "sparse_per_kv_head": False}
    assert qal.passkey_command(per_head, "t").endswith("--sparse-cache 64 --no-sparse-per-kv-head --name t")
