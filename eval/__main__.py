"""``python -m linearize.eval [lm-eval arguments]``: lm-eval's own CLI, with the
``linearize`` model registered and the local task configs (``mmlu_local``) on the task path.

    python -m linearize.eval --model linearize --model_args pretrained=DIR,adapter=LORA \\
        --tasks mmlu_local --limit 20 --batch_size 8

A plain ``lm_eval`` process never imports ``linearize``, so it does not know the model; this
entry point is that process plus one import. ``--include_path DIR`` still adds your own tasks.
"""

from __future__ import annotations

import functools
import inspect


def _with_local_tasks() -> None:
    from lm_eval.tasks import TaskManager

    from . import TASKS_DIR

    original = TaskManager.__init__
    if getattr(original, "_linearize_local_tasks", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [] if given is None else (list(given) if isinstance(given, (list, tuple)) else [given])
        bound.arguments["include_path"] = [str(TASKS_DIR)] + [str(p) for p in paths]
        original(*bound.args, **bound.kwargs)

    init._linearize_local_tasks = True
    TaskManager.__init__ = init


def main() -> None:
    import linearize.eval  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    _with_local_tasks()
    cli_evaluate()


if __name__ == "__main__":
    main()
