"""The ``linearize`` model for lm-eval: HFLM over a checkpoint loaded by ``linearize.load``.

    lm_eval.simple_evaluate(model="linearize", model_args="pretrained=DIR,adapter=LORA_DIR", ...)

Model args beyond HFLM's: ``adapter`` (a peft LoRA folder applied on top; ``peft`` is
accepted as an alias), ``teacher`` (``True`` scores the original softmax attention of
the same weights: ``linearize.teacher`` with any LoRA adapter disabled) and
``allow_nonfinite`` (``True`` loads weights holding NaN or inf instead of refusing them). Everything else (batch_size, device,
dtype, max_length, tokenizer, ...) means what it means for ``hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import linearize
from linearize import teacher
from linearize.model_folder import resolve_model_folder



def parse_dtype(value) -> torch.dtype | None:
    """``"auto"``/``None`` -> None (as saved); ``"bfloat16"``/``torch.bfloat16`` -> the dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value) == "auto":
        return None
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r} (use auto, float32, bfloat16 or float16)")
    return dtype


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def check_checkpoint(pretrained, adapter=None) -> tuple[Path, Path | None]:
    """Validate the folders before anything loads; raise with a message that says the fix.

    Raises ``FileNotFoundError`` for missing paths and ``ValueError`` for an adapter given
    without a base model, or an adapter folder passed as the base.
    """
    if pretrained is None or str(pretrained).strip() == "":
        if adapter:
            raise ValueError(
                f"adapter={adapter} needs its base model: pass pretrained=DIR (the linearized "
                "checkpoint the adapter was trained on) as well as adapter=DIR"
            )
        raise ValueError("no checkpoint given: pass pretrained=DIR")
    path = resolve_model_folder(pretrained)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ValueError(
            f"{path} is a LoRA adapter without its base model: pass the base checkpoint as "
            f"pretrained=DIR and this folder as adapter={path}"
            + (f" (the adapter was trained on {base})" if base else "")
        )
    adapter_path = None
    if adapter:
        adapter_path = Path(adapter).expanduser()
        if not adapter_path.exists():
            raise FileNotFoundError(f"no LoRA adapter at {adapter_path}")
        if not (adapter_path / "adapter_config.json").is_file():
            raise ValueError(f"{adapter_path} is not a peft adapter folder (no adapter_config.json)")
    return path, adapter_path


@register_model("linearize")
class LinearizeLM(HFLM):
    """lm-eval model over a linearized checkpoint (see the module docstring)."""

    def __init__(self, pretrained=None, adapter=None, teacher=False, allow_nonfinite=False, **kwargs):
        adapter = adapter or kwargs.pop("peft", None)
        self._allow_nonfinite = _truthy(allow_nonfinite)
        path, adapter_path = check_checkpoint(pretrained, adapter)
        self._adapter_path = adapter_path
        self._load_dtype = kwargs.get("dtype", "auto")
        self.use_teacher = _truthy(teacher)
        kwargs.pop("peft", None)
        kwargs.pop("delta", None)
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=str(path), **kwargs)
        self.adapter = str(adapter_path) if adapter_path else None

    def _get_config(self, pretrained, **kwargs) -> None:
        dtype = parse_dtype(self._load_dtype)
        self._model = linearize.load(
            pretrained, dtype=dtype, device=self._device, adapter=self._adapter_path,
            allow_nonfinite=self._allow_nonfinite,
        )
        self._config = self._model.config

    def _create_model(self, *args, **kwargs) -> None:
        # The model was loaded with its config in _get_config.
        return None

    @property
    def is_linearized(self) -> bool:
        return linearize.is_linearized(self.model)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with teacher(self.model, self.use_teacher):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with teacher(self.model, self.use_teacher):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(
            linearize_adapter=self.adapter,
            linearize_teacher=self.use_teacher,
            linearize_is_linearized=self.is_linearized,
        )
        return info
