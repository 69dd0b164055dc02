"""The registered lm-eval model and the local MMLU task, on tiny models saved to tmp_path."""

import copy
import json
import sys

import pytest
import torch

import linearize.eval as le
from linearize.eval import mmlu_local


def test_import_registers_the_model_next_to_lm_evals_own():
    from lm_eval.api.registry import get_model

    from linearize.eval.lm_model import LinearizeLM

    assert get_model("linearize") is LinearizeLM
    assert get_model("hf").__name__ == "HFLM"


def test_local_mmlu_data_and_committed_configs():
    rows = mmlu_local.load_rows()
    assert len(rows) == 57 and sum(len(v) for v in rows.values()) == 14042
    assert len(rows["elementary_mathematics"]) == 378 and len(rows["college_mathematics"]) == 100
    doc = rows["anatomy"][0]
    assert set(doc) == {"question", "subject", "choices", "answer"} and len(doc["choices"]) == 4
    expected = mmlu_local.task_yamls()
    on_disk = {p.name: p.read_text() for p in mmlu_local.MMLU_TASK_DIR.iterdir() if p.is_file()}
    assert on_disk == expected, "eval/tasks/mmlu_local is stale: run mmlu_local.write_task_yamls()"
    tm = le.task_manager(include_defaults=False)
    assert {"mmlu_local", "mmlu_local_stem", "mmlu_local_anatomy"} <= set(tm.all_tasks)


def test_mmlu_local_5_shot_prompt_through_the_registered_model(eval_model_dir):
    import lm_eval

    r = lm_eval.simple_evaluate(
        model="linearize", model_args=f"pretrained={eval_model_dir}", tasks=["mmlu_local_anatomy"],
        limit=2, task_manager=le.task_manager(include_defaults=False), batch_size=4, device="cpu", log_samples=True,
    )
    assert r["n-shot"]["mmlu_local_anatomy"] == 5
    assert 0.0 <= r["results"]["mmlu_local_anatomy"]["acc,none"] <= 1.0
    docs = mmlu_local.load_rows()["anatomy"]
    sample = r["samples"]["mmlu_local_anatomy"][0]
    context = sample["arguments"][0][0]
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert context.count("\nAnswer:") == 6 and context.endswith("\nD. " + docs[0]["choices"][3] + "\nAnswer:")
    assert context.count(docs[0]["question"].strip()) == 1
    assert docs[1]["question"].strip() in context and docs[6]["question"].strip() not in context
    assert {args[1] for args in sample["arguments"]} == {" A", " B", " C", " D"}


def test_lm_eval_cli_runs_the_mmlu_group_with_limit(eval_model_dir, tmp_path, monkeypatch, capsys):
    from linearize.eval.__main__ import main

    out = tmp_path / "lm_eval_out"
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "--model", "linearize", "--model_args", f"pretrained={eval_model_dir}",
        "--tasks", "mmlu_local", "--limit", "1", "--num_fewshot", "0", "--batch_size", "8",
        "--device", "cpu", "--output_path", str(out),
    ])
    main()
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["results"]["mmlu_local"]["sample_count"]["acc,none"] == 57
    assert res["config"]["model"] == "linearize"


def test_generation_and_teacher_mode_on_a_linearized_checkpoint(linearized_dir):
    from lm_eval.api.instance import Instance

    from linearize.eval.lm_model import LinearizeLM

    lm = LinearizeLM(pretrained=str(linearized_dir), batch_size=2, device="cpu")
    assert lm.is_linearized
    reqs = [Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}), i)
            for i, prompt in enumerate(["The capital of France is", "Question: two plus two?\nAnswer:"])]
    student = lm.generate_until(reqs)
    assert len(student) == 2 and all(isinstance(s, str) for s in student)
    ll_reqs = [Instance("loglikelihood", {}, ("The sky is", " blue"), 0),
               Instance("loglikelihood", {}, ("Grass is", " green"), 1)]
    s_ll = [x for x, _ in lm.loglikelihood(ll_reqs)]
    lm.use_teacher = True
    t_ll = [x for x, _ in lm.loglikelihood(ll_reqs)]
    assert len(lm.generate_until(reqs)) == 2
    assert s_ll != t_ll

    teacher = LinearizeLM(pretrained=str(linearized_dir), teacher="True", batch_size=2, device="cpu")
    assert [x for x, _ in teacher.loglikelihood(ll_reqs)] == pytest.approx(t_ll, abs=1e-5)


def test_lora_adapter_is_applied(eval_model_dir, eval_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from linearize.eval.lm_model import LinearizeLM

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(eval_model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, ("The sky is", " blue"), 0)]
    base = LinearizeLM(pretrained=str(eval_model_dir), batch_size=1, device="cpu")
    tuned = LinearizeLM(pretrained=str(eval_model_dir), adapter=str(adapter_dir), batch_size=1, device="cpu")
    assert isinstance(tuned.model, PeftModel)
    assert tuned.loglikelihood(reqs)[0][0] != pytest.approx(base.loglikelihood(reqs)[0][0])
    with pytest.raises(ValueError, match="adapter without its base model"):
        LinearizeLM(pretrained=str(adapter_dir), device="cpu")
    with pytest.raises(ValueError, match="needs its base model"):
        LinearizeLM(adapter=str(adapter_dir), device="cpu")


def test_bad_checkpoint_paths_fail_clearly(tmp_path, eval_model_dir):
    import lm_eval

    from linearize.eval.lm_model import LinearizeLM

    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        lm_eval.simple_evaluate(model="linearize", model_args=f"pretrained={tmp_path / 'missing'}",
                                tasks=["mmlu_local_anatomy"], limit=1,
                                task_manager=le.task_manager(include_defaults=False))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        LinearizeLM(pretrained=str(eval_model_dir), adapter=str(tmp_path / "nope"), device="cpu")
    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(ValueError, match="not a peft adapter"):
        LinearizeLM(pretrained=str(eval_model_dir), adapter=str(tmp_path / "not_adapter"), device="cpu")


def test_teacher_of_an_adapted_linearized_model_is_the_original(linearized_dir, tmp_path):
    import linearize
    from lm_eval.api.instance import Instance
    from peft import LoraConfig, get_peft_model

    from linearize.eval.lm_model import LinearizeLM

    torch.manual_seed(2)
    peft_model = get_peft_model(linearize.load(linearized_dir), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    reqs = [Instance("loglikelihood", {}, ("The sky is", " blue"), 0)]
    plain_teacher = LinearizeLM(pretrained=str(linearized_dir), teacher=True, device="cpu")
    adapted = LinearizeLM(pretrained=str(linearized_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    student_ll = adapted.loglikelihood(reqs)[0][0]
    adapted.use_teacher = True
    assert adapted.loglikelihood(reqs)[0][0] == pytest.approx(plain_teacher.loglikelihood(reqs)[0][0], abs=1e-5)
    assert student_ll != pytest.approx(plain_teacher.loglikelihood(reqs)[0][0], abs=1e-5)
