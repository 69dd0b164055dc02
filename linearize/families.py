"""Model families: where a model keeps its attention and what that attention looks like.

A new family is one `Family` entry: the mixers only rely on q/k/v/o projections (with or
without bias), optional per-head q/k RMS norms, and Llama-style rotary embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    """How to find and read the attention modules of one `model_type`."""

    model_type: str
    decoder_path: str = "model"  # the module whose forward receives the 2-D attention_mask
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    qk_norm: bool = False  # per-head RMS norms q_norm / k_norm applied before RoPE
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", notes="Llama 2/3, SmolLM2, TinyLlama"),
    "mistral": Family("mistral", notes="Mistral (its sliding window is replaced by the mixer)"),
    "qwen2": Family("qwen2", notes="Qwen2 / Qwen2.5 (q/k/v biases)"),
    "qwen3": Family("qwen3", qk_norm=True, notes="Qwen3 (per-head q/k RMS norms)"),
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no Family entry."""


def supported_families() -> str:
    return ", ".join(f"{f.model_type} ({f.notes})" for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The Family of a transformers causal LM, or a clear error listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "linearize_base_model_type", None) or getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(model).__name__
        raise UnsupportedArchitectureError(
            f"cannot linearize model_type {model_type!r} ({arch}); supported: {supported_families()}. "
            "A new family is one entry in linearize/families.py."
        )
    return FAMILIES[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    return get_submodule(model, family.layers_path)
