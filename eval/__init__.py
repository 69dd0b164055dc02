"""linearize.eval: lm-eval glue, own metrics, and reports.

Importing this package registers the ``linearize`` model with lm-eval (lazily: nothing
heavy is imported until lm-eval asks for the class). Local task configs (``mmlu_local``)
live in ``TASKS_DIR``; pass it as lm-eval's ``include_path`` or use :func:`task_manager`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _register() -> None:
    """Register with lm-eval when it is installed; without it (a bare GPU image running the
    kernel benchmarks, say) the rest of linearize.eval still imports."""
    try:
        import lm_eval.models  # noqa: F401  (registers lm-eval's own models first)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "lm_eval":
            return
        raise
    from lm_eval.api.registry import model_registry

    model_registry.register("linearize", target="linearize.eval.lm_model:LinearizeLM")


_register()


def task_manager(include_path=None, **kwargs):
    """An lm-eval ``TaskManager`` that also sees ``TASKS_DIR`` (plus ``include_path``)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else (
        list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    )
    return TaskManager(include_path=[str(TASKS_DIR)] + [str(p) for p in extra], **kwargs)


def __getattr__(name):
    lazy = {
        "perplexity": ("perplexity", "perplexity"),
        "teacher_agreement": ("agreement", "teacher_agreement"),
        "passkey_retrieval": ("passkey", "passkey_retrieval"),
        "make_passkey_sample": ("passkey", "make_passkey_sample"),
        "mqar_accuracy": ("mqar", "mqar_accuracy"),
        "make_mqar_sample": ("mqar", "make_mqar_sample"),
        "heldout_texts": ("heldout", "heldout_texts"),
        "LinearizeLM": ("lm_model", "LinearizeLM"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TASKS_DIR", "task_manager", "perplexity", "teacher_agreement", "passkey_retrieval",
    "make_passkey_sample", "mqar_accuracy", "make_mqar_sample", "heldout_texts", "LinearizeLM",
]
