"""Point lm-eval's standard zero-shot tasks at local copies of their data.

lm-eval's PIQA, ARC-Easy/Challenge, HellaSwag and WinoGrande configs download from the hub.
On a machine without it, keep their splits as files (the hub datasets' own columns, e.g.
exported with ``datasets``' ``to_json``) in one folder per task::

    DATA/piqa/{train,validation}.jsonl
    DATA/arc_easy/{train,validation,test}.jsonl
    DATA/arc_challenge/{train,validation,test}.jsonl
    DATA/hellaswag/{train,validation}.jsonl
    DATA/winogrande/{train,validation}.jsonl

(``.json``, ``.parquet`` and ``.csv`` work too; the train split is only needed for few-shot.)
:func:`write_local_task_configs` then writes one YAML per task that includes lm-eval's own
config, so prompts, metrics and helper functions stay exactly lm-eval's, and only swaps the
data source. Pass the folder as ``--include-path`` (``linearize eval``) or ``--include_path``
(``python -m linearize.eval``); the tasks keep their names.
"""

from __future__ import annotations

from pathlib import Path

# task -> (lm-eval config, relative to lm_eval/tasks; the splits its config reads)
STANDARD_TASKS = {
    "piqa": ("piqa/piqa.yaml", ("train", "validation")),
    "arc_easy": ("arc/arc_easy.yaml", ("train", "validation", "test")),
    "arc_challenge": ("arc/arc_challenge.yaml", ("train", "validation", "test")),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("train", "validation")),
    "winogrande": ("winogrande/default.yaml", ("train", "validation")),
}
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def find_splits(task_dir: Path, splits) -> tuple[str, dict[str, str]]:
    """``(datasets builder, {split: file})`` for the split files present in ``task_dir``."""
    found: dict[str, str] = {}
    builders = set()
    for split in splits:
        for ext, builder in FORMATS.items():
            path = task_dir / f"{split}{ext}"
            if path.is_file():
                found[split] = str(path.resolve())
                builders.add(builder)
                break
    if len(builders) > 1:
        raise ValueError(f"{task_dir}: mixed file formats {sorted(builders)}; use one per task")
    return (builders.pop() if builders else ""), found


def write_local_task_configs(data_root: str | Path, out_dir: str | Path, tasks=None) -> dict[str, Path]:
    """Write an overriding lm-eval YAML per task whose data is under ``data_root``.

    Returns ``{task: yaml path}``. Raises ``FileNotFoundError`` when a requested task has no
    evaluation split on disk, ``ValueError`` for a task this helper does not know.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    wanted = list(tasks) if tasks is not None else [t for t in STANDARD_TASKS if (data_root / t).is_dir()]
    unknown = [t for t in wanted if t not in STANDARD_TASKS]
    if unknown:
        raise ValueError(f"no local recipe for {', '.join(unknown)}; known: {', '.join(STANDARD_TASKS)}")
    if not wanted:
        raise FileNotFoundError(f"no task folders ({', '.join(STANDARD_TASKS)}) under {data_root}")
    lm_tasks = _lm_eval_tasks_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in wanted:
        config, splits = STANDARD_TASKS[task]
        builder, files = find_splits(data_root / task, splits)
        eval_split = "test" if "test" in splits else "validation"
        if eval_split not in files:
            raise FileNotFoundError(
                f"{data_root / task}: no {eval_split} split ({eval_split}.jsonl/.json/.parquet/.csv)")
        lines = [
            f"include: {lm_tasks / config}",
            f"task: {task}",
            f"dataset_path: {builder}",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            *[f"    {split}: {path}" for split, path in files.items()],
        ]
        for split, key in (("train", "training_split"), ("validation", "validation_split")):
            if split in splits and split not in files:
                lines.append(f"{key}: null")
        path = out_dir / f"{task}_local.yaml"
        path.write_text("\n".join(lines) + "\n")
        written[task] = path
    return written
