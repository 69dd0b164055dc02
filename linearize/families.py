"""Model families: where a model keeps its attention and what that attention looks like.

A mixer relies on q/k/v/o projections (separate, or one fused q|k|v projection), optional
q/k RMS norms (per head, or over the whole projection), Llama-style rotary embeddings that
the decoder layer hands to each attention module, and the module's own `scaling`. A new
family is one `Family` entry that says which of these it uses, plus a `check` for any
setting the mixers cannot reproduce; it is listed only once it passes the conformance suite
(tests/linearize/test_families.py).

What each family does differently, and how it is handled:

- **llama, qwen2, mistral**: the reference layout (qwen2 adds q/k/v biases, which live in
  the projections). Mistral's own sliding window (and Mixtral's, Phi-3's) is replaced by the
  mixer's window.
- **qwen3**: per-head RMS norms `q_norm`/`k_norm` on [.., H, D] after splitting into heads,
  before RoPE (`qk_norm="head"`).
- **olmo2**: RMS norms over the *whole* projection ([.., H * D], one weight per channel of
  every head, variance taken across all heads), before splitting into heads and before RoPE
  (`qk_norm="projection"`). Applying them per head would compute a different variance.
- **mixtral**: Mistral's attention with a sparse-MoE MLP; the MLP (and its router) is
  outside attention and untouched, so nothing differs for the mixers.
- **granite**: the score scale is `config.attention_multiplier` instead of 1/sqrt(D). The
  mixers read `scaling` from the attention module, so the window branch uses it; the
  residual, embedding and logit multipliers (`residual_multiplier`, `embedding_multiplier`,
  `logits_scaling`) act outside attention and stay as they are.
- **phi3**: one fused `qkv_proj` whose output is [q | k | v] (`fused_qkv="qkv_proj"`); the
  mixer holds it by reference and splits its output, so the parameter keeps its name
  (`self_attn.qkv_proj.weight`). LoRA: pass `target_modules=["qkv_proj"]` (and `"o_proj"`),
  since `q_proj`/`k_proj`/`v_proj` do not exist in Phi-3 (`Family.lora_targets`). RoPE
  scaling (`longrope`, short/long factors) is computed by the model's rotary embedding and
  arrives in the cos/sin every mixer receives, so it is followed as the config says. A
  partial rotary factor below 1 (Phi-4-mini) is refused: the mixers rotate the whole head.
- **gemma3_text**: per-head q/k RMS norms (Gemma's 1 + weight form, inside the modules);
  scale `query_pre_attn_scalar ** -0.5` (read from the module's `scaling`); layers of type
  `sliding_attention` are already local (a sliding window with their own RoPE base, passed
  per layer by the decoder) and interleaved with `full_attention` layers. Only the global
  layers' cost grows with the context, so by default only they are converted; to convert
  local layers too, name them in `LinearizeConfig.layers` (e.g. every index:
  `layers=list(range(config.num_hidden_layers))`, CLI `--layers 0,1,...`). A converted
  local layer gets the mixer's window in place of its own (set `window` to
  `config.sliding_window` to keep its reach) and keeps its own RoPE base. Embeddings are
  tied and scaled by sqrt(hidden) outside attention. Configs with `attn_logit_softcapping`
  are refused (transformers applies that cap under eager attention only, not under sdpa, so
  the teacher would depend on the attention implementation; checkpoints ship without it), and
  so is bidirectional attention.
- **gemma2**: Gemma-3's layout without q/k norms (scale `query_pre_attn_scalar ** -0.5`,
  interleaved `sliding_attention` / `full_attention` layers handled as for gemma3_text: only
  the global layers by default, one RoPE base for both kinds), plus attention logit
  soft-capping: the teacher replaces each scaled score s by c * tanh(s / c),
  c = `config.attn_logit_softcapping` (the module's `attn_logit_softcapping`), before the mask
  and the softmax. The mixers read the cap from the module and pass it as `softcap` to every
  window softmax (prefill, decode cache, LoLCATs' row max, the sparse cache), so a window that
  covers the sequence reproduces the teacher. The linear branch has no scores to cap: its
  feature maps see the raw q, k as in every other family. That is a deliberate deviation:
  the cap bounds what one key can weigh against the others, and the recurrence (whose
  weights phi(q).phi(k) are trained to stand in for the softmax beyond the window) gets no
  such bound. The final logit soft-capping (`final_logit_softcapping`) acts on the LM head's
  output, outside attention, and stays as it is. The Triton window kernels cap in place; the
  fused hybrid kernel does not yet, so a capped fixed-mix or shared-denominator layer runs
  the capped window kernel and the GLA kernel one after the other.

Not supported yet (`NOT_SUPPORTED`, refused by `convert` with the reason): the multimodal
Gemma-3 (model_type "gemma3").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    """How to find and read the attention modules of one `model_type`.

    qk_norm: "" (none), "head" (RMS norms `q_norm`/`k_norm` over each head's D channels,
        after splitting into heads) or "projection" (over the whole H * D projection, before
        splitting); both before RoPE.
    fused_qkv: name of one projection whose output is [q | k | v] ("" when q_proj, k_proj,
        v_proj are separate).
    local_layer_type: the `config.layer_types` value of layers that are already local
        (sliding-window) attention; they are left as they are unless named in `layers`.
    lora_targets: projection names a user passes to LoRA (`target_modules`) for q, k, v.
    check: called with the model config; raises UnsupportedArchitectureError for settings
        the mixers cannot reproduce.
    examples, special: for `linearize convert --list-families`.
    smoke_tested: which real checkpoint of the family was converted and run in a test ("": none;
        the family is tested only on tiny random configs).
    """

    model_type: str
    decoder_path: str = "model"  # the module whose forward receives the 2-D attention_mask
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    qk_norm: str = ""
    fused_qkv: str = ""
    local_layer_type: str = ""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    check: Callable | None = None
    examples: tuple[str, ...] = ()
    special: str = ""
    smoke_tested: str = ""

    @property
    def notes(self) -> str:
        return self.special

    @property
    def projection_names(self) -> tuple[str, ...]:
        """Names of the projection modules a mixer holds by reference (and keeps in sync with
        the teacher attention)."""
        return (self.fused_qkv, "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no Family entry, or uses a setting the mixers cannot reproduce."""


def _check_phi3(config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if factor < 1.0:
        raise UnsupportedArchitectureError(
            f"phi3 with partial_rotary_factor={factor} (e.g. Phi-4-mini) is not supported yet: the mixers rotate "
            "every channel of a head, this model only the first part. Use a Phi-3 checkpoint with full rotary "
            "embeddings.")


def _check_gemma3(config) -> None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedArchitectureError(
            f"gemma3_text with attn_logit_softcapping={config.attn_logit_softcapping} is not supported: Gemma-3's "
            "attention soft-caps the logits only under attn_implementation='eager' (its sdpa path ignores the cap), "
            "so there is no one teacher to reproduce. Set attn_logit_softcapping=None (Gemma-3 checkpoints ship "
            "without it).")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError(
            "gemma3_text with use_bidirectional_attention=True (an encoder, e.g. EmbeddingGemma) cannot be "
            "linearized: the mixers are causal recurrences. Use a causal Gemma-3 checkpoint.")


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", examples=("meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                    special="Llama 2/3, SmolLM2, TinyLlama: the reference layout",
                    smoke_tested="embedded SmolLM2-135M-Instruct (tests/linearize/test_cli.py)"),
    "mistral": Family("mistral", examples=("mistralai/Mistral-7B-v0.3",),
                      special="its own sliding window is replaced by the mixer's"),
    "qwen2": Family("qwen2", examples=("Qwen/Qwen2.5-0.5B-Instruct",), special="q/k/v biases"),
    "qwen3": Family("qwen3", qk_norm="head", examples=("Qwen/Qwen3-0.6B",), special="per-head q/k RMS norms"),
    "olmo2": Family("olmo2", qk_norm="projection", examples=("allenai/OLMo-2-0425-1B", "allenai/OLMo-2-1124-7B"),
                    special="q/k RMS norms over the whole projection, before splitting into heads"),
    "mixtral": Family("mixtral", examples=("mistralai/Mixtral-8x7B-v0.1",),
                      special="Mistral attention; sparse-MoE MLP left untouched"),
    "granite": Family("granite", examples=("ibm-granite/granite-3.3-2b-instruct",),
                      special="score scale = attention_multiplier; residual/embedding/logit multipliers "
                              "are outside attention"),
    "phi3": Family("phi3", fused_qkv="qkv_proj", lora_targets=("qkv_proj",), check=_check_phi3,
                   examples=("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct"),
                   special="fused qkv_proj split into q/k/v (LoRA target: qkv_proj); longrope from the config; "
                           "partial rotary refused"),
    "gemma3_text": Family("gemma3_text", qk_norm="head", local_layer_type="sliding_attention", check=_check_gemma3,
                          examples=("google/gemma-3-1b-it", "google/gemma-3-270m"),
                          special="per-head q/k norms, query_pre_attn_scalar scale; converts the global layers, "
                                  "local sliding layers (own RoPE base) only when named in layers"),
    "gemma2": Family("gemma2", local_layer_type="sliding_attention",
                     examples=("google/gemma-2-2b-it", "google/gemma-2-9b"),
                     special="attention logits soft-capped (c tanh(s / c), applied in the window softmax; the "
                             "linear branch has no scores to cap), query_pre_attn_scalar scale; converts the "
                             "global layers, local sliding layers only when named in layers"),
}

# model_type -> why it cannot be linearized yet (convert refuses it with this reason).
NOT_SUPPORTED: dict[str, str] = {
    "gemma3": ("this is the multimodal Gemma-3 (vision tower + language model); only text-only gemma3_text "
               "checkpoints (gemma-3-1b, gemma-3-270m) are supported yet."),
}


def supported_families() -> str:
    return ", ".join(f"{f.model_type} ({f.special})" for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The Family of a transformers causal LM, or a clear error naming why it cannot be converted."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "linearize_base_model_type", None) or getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or []) or type(model).__name__
    if model_type in NOT_SUPPORTED:
        raise UnsupportedArchitectureError(
            f"cannot linearize model_type {model_type!r} ({arch}) yet: {NOT_SUPPORTED[model_type]} "
            f"Supported: {', '.join(FAMILIES)}.")
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"cannot linearize model_type {model_type!r} ({arch}); supported: {supported_families()}. "
            "A new family is one entry in linearize/families.py."
        )
    family = FAMILIES[model_type]
    if family.check is not None:
        family.check(config)
    return family


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    return get_submodule(model, family.layers_path)


def local_layers(model_config, family: Family) -> list[int]:
    """Indices of the layers that are already local (sliding-window) attention in this family."""
    if not family.local_layer_type:
        return []
    types = getattr(model_config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == family.local_layer_type]


def layers_to_convert(family: Family, model_config, config, num_layers: int) -> list[int]:
    """The layers `convert` replaces: `config.linearized_layers`, less the family's local layers
    unless `config.layers` names layers explicitly (then exactly those)."""
    indices = config.linearized_layers(num_layers)
    if config.layers is not None:
        return indices
    local = set(local_layers(model_config, family))
    return [i for i in indices if i not in local]


def family_table() -> str:
    """The table `linearize convert --list-families` prints: supported families, then refused ones."""
    rows = [("family", "example checkpoints", "real-checkpoint smoke test", "what is special")]
    for f in FAMILIES.values():
        rows.append((f.model_type, ", ".join(f.examples), f.smoke_tested or "not run: tiny random configs only",
                     f.special))
    for model_type, reason in NOT_SUPPORTED.items():
        rows.append((model_type, "-", "-", f"NOT SUPPORTED YET: {reason}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)
