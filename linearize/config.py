"""LinearizeConfig: everything that defines a conversion, saved as JSON beside the weights."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import REGISTRY, Method, MethodDefaults

METHODS = tuple(REGISTRY)
GATES = ("liger", "scalar", "mamba2", "lightning", "none")
FEATURE_MAPS = ("softmax", "hedgehog", "taylor", "l2", "none")
MIXINGS = ("fixed", "learned", "shared-denominator", "lolcats", "window-only", "linear-only")
INITS = ("paper", "baseline")

CONFIG_NAME = "linearize_config.json"

# Each method's preset, read from the registry (`linearize.methods`).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {name: method.preset for name, method in REGISTRY.items()}


# What `linearize convert` makes when no --method is given (`LinearizeConfig.recommended()`):
# the constant-memory conversion that measures best here (docs/quality-at-length-128k.md).
# LoLCATs' hybrid started at the window + sinks baseline, so it is never worse than truncating
# attention before training, with a Mamba2 decay gate (best after training), feature maps on q
# and k before RoPE (a deviation from LoLCATs: distilled, RoPE'd maps lose the 4k passkey, see
# `linear_rope`), one recurrent state and key map per KV head (LoLCATs keeps one per query head:
# distilled, the same perplexity and passkey for 6.2 MiB less), LoLA's sparse cache of 64 exact
# pairs per layer and KV head (passkey beyond the window without training; LoLA keeps them per
# state head, which with one state per KV head is the same) and a 512-token window (LoLCATs
# publishes 64): untrained, it scores 12.40 on the 4k held-out documents against 16.58 at window
# 64 and 14.62 at window 64 distilled; 32.9 MiB of decode state at 16k tokens.
RECOMMENDED: dict[str, Any] = {"method": "lolcats", "init": "baseline", "gate": "mamba2", "linear_rope": False,
                               "share_state_across_group": True, "sparse_cache": 64, "sparse_per_kv_head": True,
                               "window": 512}


class ConfigError(ValueError):
    """A LinearizeConfig field has a bad value; the message names the field and the fix."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LinearizeConfig:
    """How to linearize a model. Fields left as None take the method's default.

    method: one of `METHODS`.
    window: sliding-window size of the softmax branch; 0 gives the pure recurrent form.
    num_sink_tokens: first tokens every query keeps attending to (window-sinks: 4).
    num_sink_logits: learned per-head logits that only enter the window's softmax
        denominator (Lizard's meta-memory, 4).
    gate: `liger` (pooled key, per channel), `scalar` (sigmoid of a learned projection, per
        token and head), `mamba2` (-exp(A) softplus(dt)), `lightning` (a constant decay per state
        head from ALiBi slopes scaled by depth, no parameters: Lightning Attention / MiniMax-01),
        or `none`.
    feature_map: `softmax` (over the head dimension, Liger), `hedgehog` (learned, LoLCATs and
        Lizard), `taylor` (Based's 2nd-order Taylor map of exp on a learned projection), `l2`
        (L2 normalisation per head, gated-deltanet only) or `none` (window-only methods).
    feature_dim: width of the learned projection: Hedgehog's (None: the head dimension; the map
        outputs twice this many features) or Taylor's d (None: 16; the map outputs 1 + d + d^2
        features, the state's key width, so memory grows with d^2).
    mixing: `fixed` (window_weight, linear_weight), `learned` (per-head weights initialised
        to window_weight, linear_weight), `lolcats` (LoLCATs as published: gamma-weighted
        max-shifted window terms and linear terms over the keys past the window, one
        denominator), `shared-denominator` (our option for any method: window and linear
        terms over every key under one denominator, linear weight sigmoid(a)), `window-only`,
        `linear-only` (implied by window=0).
    init: `paper` (the method's published initialisation) or `baseline`: the untrained model
        computes exactly the window + sinks baseline (linear branch weighed 0 through a
        learned per-head weight, 4 sink tokens unless set, no sink logits unless set), so
        training starts at the baseline's quality and the recurrence can only add to it.
    normalize: divide the recurrence by its normalizer phi(q) z_t.
    linear_rope: feed RoPE-rotated q and k to the feature maps (LoLCATs as published). Such
        maps see rotation angles only up to the training length: past it a distilled model's
        linear mass grows with the position alone (`scripts/linear_mass_by_position.py`).
    gate_normalizer: Liger divides the log gate by this (16).
    layers: layer indices to linearize (None: every layer not in softmax_layers).
    softmax_layers: layer indices that keep softmax attention (inter-layer hybrid).
    share_state_across_group: keep the recurrent state (and learned key feature maps) per KV
        head, shared by the query heads of a GQA group: H/H_kv times less state. False keeps
        one per query head, keys repeated first (LoLCATs' published form, its default; for
        parameter-free maps the result is the same).
    lolcats_init_window_factor: LoLCATs' per-head window factor gamma = sigmoid(w) at
        initialisation (0.1 in the published configs).
    sparse_cache: LoLA's sparse global cache (inference only, needs mixing='lolcats'): this
        many key/value pairs per layer and state head, those the recurrent state reproduces
        worst, stay exact beside the window instead of entering the state; 0 turns it off.
        See `linearize.kernels.hybrid.sparse_cache`.
    sparse_block: the cache's selection runs every this many tokens (LoLA's chunk; a query
        then sees between `window` and `window + sparse_block - 1` recent tokens exactly).
    sparse_per_kv_head: the cache's pairs per KV head, shared by the state heads of its GQA group
        (chosen by their errors together), instead of per state head as LoLA has it: H/H_kv times
        fewer stored pairs with feature maps per query head; the same as LoLA's with
        share_state_across_group. An option beyond the paper; see docs/recall-beyond-the-window.md.
    full_attention_heads: head-level hybrid (DuoAttention-style): {layer index: [KV-head
        indices]} whose heads keep exact causal softmax over every past token and a growing KV
        cache (with GQA, a KV head and all its query heads); the other heads of the layer stay
        the method's hybrid. {} (default) changes nothing. See `linearize.mixers.full_heads`;
        `linearize select-heads` chooses them by a measured retrieval score.
    """

    method: str = "liger-gla"
    window: int | None = None
    num_sink_tokens: int | None = None
    num_sink_logits: int | None = None
    gate: str | None = None
    feature_map: str | None = None
    feature_dim: int | None = None
    mixing: str | None = None
    window_weight: float = 0.5
    linear_weight: float = 0.5
    normalize: bool | None = None
    linear_rope: bool | None = None
    gate_normalizer: float = 16.0
    layers: list[int] | None = None
    softmax_layers: list[int] = field(default_factory=list)
    share_state_across_group: bool | None = None
    lolcats_init_window_factor: float = 0.1
    init: str | None = None
    sparse_cache: int = 0
    sparse_block: int = 64
    sparse_per_kv_head: bool = False
    full_attention_heads: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def recommended(cls, **overrides: Any) -> "LinearizeConfig":
        """The `RECOMMENDED` conversion (the CLI's default), with fields overridden."""
        return cls(**{**RECOMMENDED, **overrides})

    def resolved(self) -> "LinearizeConfig":
        """A copy with every method default filled in."""
        d = self.method_class().preset
        out = dataclasses.replace(self)
        out.window = d.window if self.window is None else self.window
        out.gate = d.gate if self.gate is None else self.gate
        out.feature_map = d.feature_map if self.feature_map is None else self.feature_map
        out.normalize = d.normalize if self.normalize is None else self.normalize
        out.linear_rope = d.linear_rope if self.linear_rope is None else self.linear_rope
        out.num_sink_tokens = d.num_sink_tokens if self.num_sink_tokens is None else self.num_sink_tokens
        out.num_sink_logits = d.num_sink_logits if self.num_sink_logits is None else self.num_sink_logits
        out.share_state_across_group = (d.share_state if self.share_state_across_group is None
                                         else self.share_state_across_group)
        out.init = d.init if self.init is None else self.init
        if self.mixing is not None:
            out.mixing = self.mixing
        elif out.window == 0:
            out.mixing = "linear-only"
        else:
            out.mixing = d.mixing
        if out.window == 0:
            out.num_sink_tokens = 0
            out.num_sink_logits = 0
        if out.mixing in ("shared-denominator", "lolcats") and not out.normalize:
            raise ConfigError(f"mixing={out.mixing!r} needs the recurrence's normalizer: set normalize=True")
        if out.init == "baseline":
            out._start_at_baseline(self)
        out.check_sparse_cache()
        out.validate()
        return out

    def check_sparse_cache(self) -> None:
        """ConfigError unless a sparse cache is off or has the past-window hybrid (resolved config)."""
        if self.sparse_cache and self.mixing != "lolcats":
            raise ConfigError(f"sparse_cache needs the past-window hybrid (method lolcats, mixing='lolcats'): "
                              f"{self.method} with mixing={self.mixing!r} has no state that pairs leave the window "
                              "into; set sparse_cache=0, or reconvert with method lolcats")

    def _start_at_baseline(self, given: "LinearizeConfig") -> None:
        """Fields for init='baseline': the linear branch weighs 0 under a learned weight."""
        if not self.has_linear_branch:
            return
        if not self.has_window_branch:
            raise ConfigError("init='baseline' needs a window branch (window >= 1): the baseline is window + sinks")
        if self.mixing == "shared-denominator":
            raise ConfigError("init='baseline' supports mixing fixed, learned and lolcats; shared-denominator's "
                              "sigmoid weight cannot start at 0: use init='paper' or another mixing")
        self.num_sink_tokens = 4 if given.num_sink_tokens is None else given.num_sink_tokens
        self.num_sink_logits = 0 if given.num_sink_logits is None else given.num_sink_logits
        if self.mixing in ("fixed", "learned"):
            self.mixing, self.window_weight, self.linear_weight = "learned", 1.0, 0.0

    def method_class(self) -> type[Method]:
        """The `Method` this config names (its preset and rules)."""
        return REGISTRY[self.method]

    @property
    def has_window_branch(self) -> bool:
        """Whether the resolved config keeps a softmax window (sinks included)."""
        return self.window > 0 and self.mixing != "linear-only"

    @property
    def has_linear_branch(self) -> bool:
        """Whether the resolved config keeps a recurrent branch."""
        return self.mixing != "window-only"

    def validate(self) -> None:
        """ConfigError for a value no method takes, then for one this config's method refuses
        (`Method.problem`)."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.window is not None and (not _is_int(self.window) or self.window < 0):
            raise ConfigError(f"window must be an integer >= 1 (or 0 for the pure recurrent form), got {self.window!r}")
        for name in ("num_sink_tokens", "num_sink_logits", "feature_dim"):
            val = getattr(self, name)
            if val is not None and (not _is_int(val) or val < (1 if name == "feature_dim" else 0)):
                raise ConfigError(f"{name} must be a {'positive' if name == 'feature_dim' else 'non-negative'} integer, got {val!r}")
        for name, choices in (("gate", GATES), ("feature_map", FEATURE_MAPS), ("mixing", MIXINGS), ("init", INITS)):
            val = getattr(self, name)
            if val is not None and val not in choices:
                raise ConfigError(f"unknown {name} {val!r}; choose one of: {', '.join(choices)}")
        if self.window == 0 and self.mixing not in (None, "linear-only"):
            raise ConfigError(f"window=0 has no window branch: mixing must be linear-only, got {self.mixing!r}")
        self._validate_numbers()
        problem = self.method_class().problem(self)
        if problem:
            raise ConfigError(problem)
        self._validate_layers()
        self._validate_full_heads()

    def _validate_full_heads(self) -> None:
        """Normalise full_attention_heads to {int layer: sorted heads} (JSON keys are strings)
        and refuse what no model takes; ranges against the model are checked at conversion."""
        val = self.full_attention_heads
        fix = "give {layer index: [KV-head indices]}, e.g. {3: [0], 7: [1, 2]} (convert --full-attention-heads 3:0,7:1,7:2)"
        if not isinstance(val, dict):
            raise ConfigError(f"full_attention_heads must be a dict; {fix}; got {val!r}")
        out = {}
        for layer, heads in val.items():
            key = int(layer) if isinstance(layer, str) and layer.isdigit() else layer
            if not _is_int(key) or key < 0:
                raise ConfigError(f"full_attention_heads: layer {layer!r} is not a non-negative layer index; {fix}")
            if key in out:
                raise ConfigError(f"full_attention_heads: layer {key} is listed twice; merge its heads into one list")
            if not isinstance(heads, (list, tuple)) or not heads or not all(_is_int(h) and h >= 0 for h in heads):
                raise ConfigError(f"full_attention_heads: layer {key} needs a non-empty list of non-negative KV-head "
                                  f"indices, got {heads!r}; {fix}")
            if len(set(heads)) != len(heads):
                raise ConfigError(f"full_attention_heads: layer {key} lists a head twice ({list(heads)}); "
                                  "list each KV head once")
            out[key] = sorted(int(h) for h in heads)
        self.full_attention_heads = dict(sorted(out.items()))
        softmax = sorted(set(out) & set(self.softmax_layers or []))
        if softmax:
            raise ConfigError(f"full_attention_heads names layers {softmax} that keep softmax attention whole "
                              "(softmax_layers): every head there is already full; drop them from one of the two")
        if self.layers is not None and set(out) - set(self.layers):
            raise ConfigError(f"full_attention_heads names layers {sorted(set(out) - set(self.layers))} that are not "
                              f"linearized (layers={self.layers}): add them to layers or drop them")

    def check_full_attention_heads(self, num_kv_heads: int) -> None:
        """ConfigError when a head index in full_attention_heads is >= the model's KV heads."""
        bad = {layer: [h for h in heads if h >= num_kv_heads]
               for layer, heads in self.full_attention_heads.items() if any(h >= num_kv_heads for h in heads)}
        if bad:
            raise ConfigError(f"full_attention_heads {bad}: head indices count KV heads and the model has "
                              f"{num_kv_heads} (0..{num_kv_heads - 1}); with GQA, a KV head keeps all its query heads")

    def _validate_numbers(self) -> None:
        for name in ("window_weight", "linear_weight", "gate_normalizer"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
                raise ConfigError(f"{name} must be a finite number, got {val!r}")
        if self.gate_normalizer <= 0:
            raise ConfigError(f"gate_normalizer must be > 0, got {self.gate_normalizer}")
        if not 0.0 < self.lolcats_init_window_factor < 1.0:
            raise ConfigError(f"lolcats_init_window_factor must be in (0, 1), got {self.lolcats_init_window_factor}")
        for name in ("normalize", "linear_rope", "share_state_across_group", "sparse_per_kv_head"):
            val = getattr(self, name)
            if val is not None and not isinstance(val, bool):
                raise ConfigError(f"{name} must be true or false, got {val!r}")
        for name, low in (("sparse_cache", 0), ("sparse_block", 1)):
            val = getattr(self, name)
            if not _is_int(val) or val < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {val!r}")

    def _validate_layers(self) -> None:
        for name in ("layers", "softmax_layers"):
            val = getattr(self, name)
            if val is None:
                continue
            if not isinstance(val, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in val):
                raise ConfigError(f"{name} must be a list of non-negative layer indices, got {val!r}")
            setattr(self, name, sorted(set(int(i) for i in val)))
        if self.layers is not None and set(self.layers) & set(self.softmax_layers):
            both = sorted(set(self.layers) & set(self.softmax_layers))
            raise ConfigError(f"layers {both} are listed both to linearize and to keep as softmax attention")

    def linearized_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers this config converts in a model with `num_layers` layers."""
        for name in ("layers", "softmax_layers"):
            bad = [i for i in (getattr(self, name) or []) if i >= num_layers]
            if bad:
                raise ConfigError(f"{name} {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        bad = [i for i in self.full_attention_heads if i >= num_layers]
        if bad:
            raise ConfigError(f"full_attention_heads layers {bad} out of range: the model has {num_layers} layers "
                              f"(0..{num_layers - 1})")
        chosen = range(num_layers) if self.layers is None else self.layers
        return [i for i in chosen if i not in set(self.softmax_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearizeConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a linearize config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if "lolcats_init_linear_weight" in data:
            raise ConfigError("this config was saved by a linearize whose LoLCATs put a weight on the linear terms "
                              "over every key, unlike the published method; reconvert the model with this version")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown linearize config field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LinearizeConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-save the model or fix the file") from e
        return cls.from_dict(data)
