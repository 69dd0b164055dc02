"""Standard tasks (PIQA, ARC-e/c, HellaSwag, WinoGrande) over local files, via lm-eval's configs."""

import json

import pytest

import linearize.eval as le
from linearize.eval.local_tasks import STANDARD_TASKS, write_local_task_configs

PIQA = [{"goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "To dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1}]
ARC = [{"id": "a1", "question": "Which is a planet?",
        "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]}, "answerKey": "A"},
       {"id": "a2", "question": "Water freezes at?",
        "choices": {"text": ["0 C", "50 C", "100 C", "10 C"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"}]
HELLASWAG = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
              "ctx": "A man cracks an egg. he", "endings": ["fries it.", "flies away.", "sings.", "sleeps."],
              "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"} for i in range(2)]
WINOGRANDE = [{"sentence": "The trophy does not fit in the suitcase because _ is too big.",
               "option1": "trophy", "option2": "suitcase", "answer": "1"},
              {"sentence": "Anna thanked Sue because _ had helped.", "option1": "Anna", "option2": "Sue",
               "answer": "2"}]
DATA = {"piqa": (PIQA, ["train", "validation"]), "arc_easy": (ARC, ["validation", "test"]),
        "arc_challenge": (ARC, ["train", "validation", "test"]), "hellaswag": (HELLASWAG, ["validation"]),
        "winogrande": (WINOGRANDE, ["train", "validation"])}


def write_data(root):
    for task, (rows, splits) in DATA.items():
        (root / task).mkdir(parents=True)
        for split in splits:
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_standard_tasks_run_from_local_files(eval_model_dir, tmp_path):
    import lm_eval

    write_data(tmp_path / "data")
    written = write_local_task_configs(tmp_path / "data", tmp_path / "tasks")
    assert set(written) == set(STANDARD_TASKS)
    assert "training_split: null" in written["hellaswag"].read_text()
    r = lm_eval.simple_evaluate(
        model="linearize", model_args=f"pretrained={eval_model_dir}", tasks=list(STANDARD_TASKS), limit=2,
        task_manager=le.task_manager(include_path=tmp_path / "tasks", include_defaults=False),
        batch_size=4, device="cpu",
    )
    for task in STANDARD_TASKS:
        assert r["n-samples"][task]["effective"] == 2
        assert 0.0 <= r["results"][task]["acc,none"] <= 1.0
    assert "acc_norm,none" in r["results"]["hellaswag"] and "acc_norm,none" in r["results"]["arc_challenge"]


def test_missing_local_data_is_explained(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "train.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="no validation split"):
        write_local_task_configs(tmp_path, tmp_path / "out", tasks=["piqa"])
    with pytest.raises(ValueError, match="no local recipe for lambada"):
        write_local_task_configs(tmp_path, tmp_path / "out", tasks=["lambada"])
    with pytest.raises(FileNotFoundError, match="no task folders"):
        write_local_task_configs(tmp_path / "piqa", tmp_path / "out")
