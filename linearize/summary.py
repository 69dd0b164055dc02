"""What a conversion did, in numbers: layers, added parameters, decode-state memory."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .config import LinearizeConfig
from .convert import is_linearized, linearize_state, mixers, new_parameters
from .sparse_cache import pairs_kept_per


@dataclass
class ConversionSummary:
    method: str
    num_layers: int
    linearized_layers: list[int]
    softmax_layers: list[int]
    added_parameters: int
    total_parameters: int
    state_bytes: dict[int, int]  # context length -> student decode-state bytes
    teacher_kv_bytes: dict[int, int]  # context length -> teacher KV-cache bytes
    full_attention_heads: int = 0  # KV heads kept exact in linearized layers (head-level hybrid)
    kv_bytes_per_token: int = 0  # keys + values of one token in every layer (the teacher's per-token cache)
    truncation_sinks: int = 0  # sink tokens of the window-sinks method (the plain window it is compared with)
    constant_parts: dict[str, int] = field(default_factory=dict)  # what holds the linearized layers' fixed bytes

    def equal_window(self, context: int) -> int | None:
        """The longest plain window (window + sinks in every layer, no recurrence) whose decode
        state is no larger than this model's at `context` tokens; None for an unconverted model."""
        if not self.linearized_layers or not self.kv_bytes_per_token:
            return None
        return max(self.state_bytes[context] // self.kv_bytes_per_token + 1 - self.truncation_sinks, 0)

    def lines(self) -> list[str]:
        out = [
            f"method              {self.method}",
            f"layers linearized   {len(self.linearized_layers)} of {self.num_layers}: {_ranges(self.linearized_layers)}",
            f"layers kept softmax {len(self.softmax_layers)}: {_ranges(self.softmax_layers) or '-'}",
            f"parameters added    {self.added_parameters:,} ({100 * self.added_parameters / max(self.total_parameters, 1):.3f}% of {self.total_parameters:,})",
        ]
        if self.full_attention_heads:
            out.append(f"full-attention heads {self.full_attention_heads} KV heads in linearized layers "
                       "(their KV cache grows with the context, counted below)")
        for ctx in sorted(self.state_bytes):
            s, t = self.state_bytes[ctx], self.teacher_kv_bytes[ctx]
            out.append(f"decode state @ {ctx // 1024}k  {_mib(s)} vs teacher KV cache {_mib(t)} ({t / max(s, 1):.1f}x smaller)")
        parts = [f"{name} {n / 2**20:.2f} MiB" for name, n in self.constant_parts.items() if n]
        if parts:
            out.append(f"constant part       {', '.join(parts)}")
        windows = {ctx: self.equal_window(ctx) for ctx in sorted(self.state_bytes)}
        if None not in windows.values() and windows:
            sizes = ({f"{w:,}" for w in windows.values()} if len(set(windows.values())) == 1
                     else [f"{w:,} at {ctx // 1024}k" for ctx, w in windows.items()])
            out.append(f"same memory as     a plain window of {', '.join(sizes)} tokens + {self.truncation_sinks} sinks "
                       "(--method window-sinks): the truncation to compare with")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def _ranges(idx: list[int]) -> str:
    if not idx:
        return ""
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one token adds to one softmax layer's KV cache (keys + values)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_key_value_heads * head_dim * elem


def layer_state_parts(mixer) -> dict[str, int]:
    """Constant decode-state bytes of one mixer by what holds them: the fp32 recurrent state,
    the window and sink buffers, and LoLA's sparse cache (its pairs and the tokens waiting for
    a selection); not the RoPE rotation the layers share (`rotation_state_bytes`)."""
    cfg = mixer.lconfig
    elem = mixer.o_proj.weight.element_size()
    parts = {"window + sinks": 0, "recurrent state": 0, "sparse cache": 0}
    if mixer.has_linear:
        feat = mixer.linearize_feature_map_k.out_dim
        parts["recurrent state"] = mixer.state_heads * feat * (mixer.head_dim + int(bool(cfg.normalize))) * 4
    if mixer.has_window:
        slots = cfg.window - 1 + cfg.num_sink_tokens
        parts["window + sinks"] = slots * 2 * mixer.num_kv_heads * mixer.head_dim * elem
    parts["sparse cache" if cfg.sparse_cache else "window + sinks"] += mixer.extra_state_bytes()
    return parts


def layer_state_bytes(mixer) -> int:
    """Constant decode-state bytes of one mixer (`layer_state_parts` together)."""
    return sum(layer_state_parts(mixer).values())


def rotation_state_bytes(model: nn.Module) -> int:
    """Bytes of the RoPE rotations the linearized layers' decode states share: one copy per
    distinct rotation. Layers of different `layer_types` (Gemma-3's local and global RoPE) are
    counted apart, a bound where their rotations are in fact equal."""
    types = getattr(model.config, "layer_types", None)
    per_rotation: dict = {}
    for mixer in mixers(model):
        key = types[mixer.layer_idx] if types else None
        per_rotation[key] = max(per_rotation.get(key, 0), mixer.rotation_state_bytes())
    return sum(per_rotation.values())


def summarize(model: nn.Module, contexts: tuple[int, ...] = (4096, 32768)) -> ConversionSummary:
    """Summary of a converted (or plain) model; decode bytes are per sequence."""
    cfg = model.config
    n = cfg.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    if not is_linearized(model):
        kv = kv_bytes_per_token(model)
        return ConversionSummary("none (softmax attention)", n, [], list(range(n)), 0, total,
                                 {c: n * kv * c for c in contexts}, {c: n * kv * c for c in contexts})
    st = linearize_state(model)
    kept = [i for i in range(n) if i not in set(st.layers)]
    kv = kv_bytes_per_token(model)
    parts: dict[str, int] = {}
    for mixer in mixers(model):
        for name, b in layer_state_parts(mixer).items():
            parts[name] = parts.get(name, 0) + b
    parts["RoPE rotation (all layers)"] = rotation_state_bytes(model)
    fixed = sum(parts.values())
    full_heads = sum(len(m.full_heads) for m in mixers(model))
    full_kv = kv * full_heads // model.config.num_key_value_heads  # per token, kept heads' keys + values
    added = sum(p.numel() for _, p in new_parameters(model))
    method = st.config.method
    if st.config.sparse_cache:
        method += (f" + sparse cache of {st.config.sparse_cache} pairs per layer and "
                   f"{pairs_kept_per(st.config.sparse_per_kv_head)} "
                   f"(selected every {st.config.sparse_block} tokens)")
    return ConversionSummary(
        method, n, list(st.layers), kept, added, total,
        {c: fixed + (len(kept) * kv + full_kv) * c for c in contexts}, {c: n * kv * c for c in contexts},
        full_heads, n * kv, LinearizeConfig(method="window-sinks").resolved().num_sink_tokens, parts,
    )
