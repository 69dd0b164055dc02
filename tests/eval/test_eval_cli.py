"""`linearize eval` / `linearize report` through their argparse functions."""

import argparse
import json

import pytest

from linearize.eval.cli_commands import add_eval_arguments, add_report_arguments, run_eval, run_report
from linearize.eval.runner import recovery, task_scores


def eval_args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


SMALL = ["--ppl-texts", 3, "--max-length", 64, "--stride", 32, "--agreement-length", 48,
         "--passkey-lengths", "192", "--passkey-depths", "0,1", "--mqar-pairs", "2,4",
         "--mqar-samples", 2, "--batch-size", 4, "--device", "cpu"]


def test_eval_student_and_teacher_then_report(linearized_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = run_eval(eval_args(linearized_dir, "--tasks", "mmlu_local_anatomy", "--limit", 2,
                              "--num-fewshot", 1, "--teacher", "--metrics", "ppl,agreement,passkey,mqar",
                              "--out", run, *SMALL))
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mmlu_local_anatomy | acc | 1 |" in printed and "Recovery" in printed
    res = json.loads((run / "results.json").read_text())
    assert res["is_linearized"] and res["settings"]["teacher"]
    row = res["tasks"]["mmlu_local_anatomy"]
    assert row["samples"] == 2 and row["metric"] == "acc"
    assert set(res["metrics"]) == {"perplexity", "agreement", "passkey", "mqar"}
    ppl = res["metrics"]["perplexity"]
    assert ppl["student"]["perplexity"] != ppl["teacher"]["perplexity"]
    assert ppl["recovery"] == pytest.approx(100 * ppl["teacher"]["perplexity"] / ppl["student"]["perplexity"])
    assert 0 < res["metrics"]["agreement"]["top1_agreement"] <= 100
    for name in ("tasks", "agreement", "passkey", "mqar"):
        png = run / res["plots"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "lm_eval_student.json").is_file() and (run / "lm_eval_teacher.json").is_file()
    md = (run / "results.md").read_text()
    assert "| Task | Metric | Shots | Teacher | Student | Recovery |" in md and "plots/mqar.png" in md

    second = tmp_path / "run_b"
    assert run_eval(eval_args(linearized_dir, "--tasks", "none", "--metrics", "mqar", "--out", second, *SMALL)) == 0
    out = tmp_path / "reports" / "report.md"
    parser = add_report_arguments(argparse.ArgumentParser())
    assert run_report(parser.parse_args([str(run), str(second / "results.json"), "--out", str(out)])) == 0
    report = out.read_text()
    assert "| mmlu_local_anatomy | acc | 1 |" in report and "`run`, `run_b`" in report
    assert "../run/plots/passkey.png" in report and "report_plots/mqar.png" in report
    assert (out.parent / "report_plots" / "mqar.png").is_file()


def test_bad_input_is_reported_before_loading(eval_model_dir, tmp_path, capsys):
    assert run_eval(eval_args(eval_model_dir, "--tasks", "mmlu_locl,piqa_nonexistent", "--out", tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "unknown task(s): mmlu_locl (did you mean mmlu_local" in err and "piqa_nonexistent" in err
    assert run_eval(eval_args(tmp_path / "missing", "--out", tmp_path / "b")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert run_eval(eval_args(eval_model_dir, "--adapter", tmp_path / "nope", "--out", tmp_path / "c")) == 2
    assert "no LoRA adapter" in capsys.readouterr().err
    assert run_eval(eval_args(eval_model_dir, "--metrics", "ppl,bleu", "--out", tmp_path / "d")) == 2
    assert "unknown metric(s): bleu" in capsys.readouterr().err
    parser = add_report_arguments(argparse.ArgumentParser())
    assert run_report(parser.parse_args([str(tmp_path / "nothing")])) == 2
    assert "no results.json" in capsys.readouterr().err


def test_plain_model_teacher_is_not_run_twice(eval_model_dir, tmp_path):
    run = tmp_path / "plain"
    assert run_eval(eval_args(eval_model_dir, "--tasks", "none", "--teacher", "--metrics", "ppl,agreement",
                              "--out", run, *SMALL)) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["metrics"]["perplexity"]["recovery"] == pytest.approx(100.0)
    assert "agreement" not in res["metrics"] and len(res["notes"]) == 2


def test_task_scores_pick_the_paper_metric():
    results = {
        "results": {
            "arc_challenge": {"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.35,
                              "acc_norm_stderr,none": 0.012},
            "piqa": {"acc,none": 0.6, "acc_stderr,none": 0.02, "acc_norm,none": 0.61},
            "mmlu_local_anatomy": {"acc,none": 0.25}, "mmlu_local_virology": {"acc,none": 0.5},
        },
        "groups": {"mmlu_local": {"acc,none": 0.4, "acc_stderr,none": "N/A"}},
        "group_subtasks": {"mmlu_local": ["mmlu_local_other", "mmlu_local_stem"],
                           "mmlu_local_other": ["mmlu_local_virology"], "mmlu_local_stem": ["mmlu_local_anatomy"]},
        "n-shot": {"arc_challenge": 0, "piqa": 0, "mmlu_local_anatomy": 5, "mmlu_local_virology": 5},
        "n-samples": {"mmlu_local_anatomy": {"effective": 3}, "mmlu_local_virology": {"effective": 4},
                      "piqa": {"effective": 10}, "arc_challenge": {"effective": 10}},
    }
    s = task_scores(results, ["arc_challenge", "piqa", "mmlu_local"])
    assert s["arc_challenge"]["metric"] == "acc_norm" and s["arc_challenge"]["value"] == pytest.approx(35.0)
    assert s["arc_challenge"]["stderr"] == pytest.approx(1.2)
    assert s["piqa"]["metric"] == "acc" and s["piqa"]["value"] == pytest.approx(60.0)
    assert s["mmlu_local"] == {"metric": "acc", "value": pytest.approx(40.0), "stderr": None,
                               "num_fewshot": 5, "samples": 7}
    assert recovery(30.0, 40.0) == pytest.approx(75.0) and recovery(1.0, 0.0) is None


def test_every_argument_is_checked_before_the_model_loads(eval_model_dir, tmp_path, capsys, monkeypatch):
    """#19 item 11: an offline task, a bad --limit or a folder without a tokenizer costs seconds, not a model load."""
    import shutil

    from linearize.eval.lm_model import LinearizeLM

    monkeypatch.setattr(LinearizeLM, "__init__", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run_eval(eval_args(eval_model_dir, "--tasks", "piqa", "--metrics", "none", "--out", tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "task piqa: its documents cannot be loaded" in err and "--include-path" in err
    for limit in ("0", "-1"):
        assert run_eval(eval_args(eval_model_dir, "--limit", limit, "--out", tmp_path / "b")) == 2
        assert "--limit must be > 0" in capsys.readouterr().err
    assert run_eval(eval_args(eval_model_dir, "--tasks", "none", "--stride", "0", "--out", tmp_path / "c")) == 2
    assert "--stride must be >= 1" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(eval_model_dir / name, bare / name)
    assert run_eval(eval_args(bare, "--tasks", "none", "--out", tmp_path / "d")) == 2
    err = capsys.readouterr().err
    assert f"{bare} has no usable tokenizer" in err and "tokenizer.json" in err
