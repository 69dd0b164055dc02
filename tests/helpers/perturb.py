"""perturb(model, seed): give a converted model's new parameters random, per-head distinct values.

A freshly converted model is degenerate in exactly the places a consistent mistake hides:
gate projections are zero (every token decays the same), Hedgehog maps are the identity
(every head's map is the same), sink logits, branch weights and LoLCATs' linear weight are
equal across heads. A test comparing two paths of our code on such a model cannot tell a
gate read from the wrong token, or a per-head parameter read with the wrong head index.
After `perturb` every one of those choices changes the output.

Values (drawn in fp32 from one generator seeded with `seed`, mixer by mixer in layer order,
so the same seed on the same architecture gives the same model; copied into each
parameter's dtype and device):

- Hedgehog maps `linearize_feature_map_{q,k}.weight` [H, D, F]: the identity plus
  N(0, 0.5^2) per entry, so no head's map is the identity or equal to another head's.
- scalar gate `linearize_gate.proj`: weight N(0, 1/C) (the pre-activation then varies by
  about 1 from token to token for unit-scale hidden states), bias U(1, 3) per KV head:
  log decay between about -0.05 and -0.3 per token, different for every token and head.
- Mamba2 gate `linearize_gate.dt_proj`: weight N(0, 1/C), bias U(-3, -1), and A_log U(-1, 0.5)
  per KV head: log decay -exp(A) softplus(dt) of about -0.02 .. -0.5.
- sink logits [H, M]: N(0, 1), each (head, slot) its own value, comparable to window scores.
- learned branch weights [H]: U(0.3, 1.2) each, window and linear independently.
- LoLCATs linear logit [H]: N(-1, 1).
- LoLCATs' learned linear factor [H] (init baseline, clamped at 0): U(0.3, 1.2), so that no
  head's linear branch is switched off (a noise-level gradient could then not be compared).
- anything else whose name starts with `linearize_`: its value plus N(0, 0.3^2) per entry
  (so a parameter added later is still moved off its initialisation).
"""
from __future__ import annotations

import math

import torch

from linearize import mixers


def _normal(gen, shape, mean=0.0, std=1.0):
    return torch.randn(shape, generator=gen) * std + mean


def _uniform(gen, shape, lo, hi):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _value(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(p.shape)
    if name.startswith("linearize_feature_map_") and name.endswith(".weight"):
        H, D, F = shape
        eye = torch.eye(D, F).expand(H, D, F)
        return eye + _normal(gen, shape, std=0.5)
    if name == "linearize_gate.proj.weight" or name == "linearize_gate.dt_proj.weight":
        return _normal(gen, shape, std=1.0 / math.sqrt(shape[-1]))
    if name == "linearize_gate.proj.bias":
        return _uniform(gen, shape, 1.0, 3.0)
    if name == "linearize_gate.dt_proj.bias":
        return _uniform(gen, shape, -3.0, -1.0)
    if name == "linearize_gate.A_log":
        return _uniform(gen, shape, -1.0, 0.5)
    if name == "linearize_sink_logits":
        return _normal(gen, shape)
    if name in ("linearize_window_weight", "linearize_linear_weight"):
        return _uniform(gen, shape, 0.3, 1.2)
    if name == "linearize_linear_logit":
        return _normal(gen, shape, mean=-1.0)
    if name == "linearize_linear_factor":
        return _uniform(gen, shape, 0.3, 1.2)
    return p.detach().float().cpu() + _normal(gen, shape, std=0.3)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Set every new parameter of the converted `model` (in place) to seeded random values; returns it.

    Works on a whole converted model or on a single mixer (`LinearizedAttention`).
    """
    gen = torch.Generator().manual_seed(seed)
    found = [model] if hasattr(model, "new_parameters") else mixers(model)
    if not found:
        raise ValueError("perturb needs a converted model (linearize.convert) or a mixer")
    for mixer in found:
        for name, p in mixer.new_parameters():
            p.copy_(_value(name, p, gen).to(dtype=p.dtype, device=p.device))
    return model


def per_head_distinct(model: torch.nn.Module) -> bool:
    """True when, in every mixer, no two heads share the value of any per-head new parameter."""
    for mixer in ([model] if hasattr(model, "new_parameters") else mixers(model)):
        for name, p in mixer.new_parameters():
            if p.dim() == 0 or p.shape[0] < 2:
                continue
            rows = p.detach().reshape(p.shape[0], -1)
            for i in range(rows.shape[0]):
                for j in range(i):
                    if torch.equal(rows[i], rows[j]):
                        return False
    return True
