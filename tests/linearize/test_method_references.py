"""Each method's attention layer against an independent fp64 reference written from the equations.

The reference below is a plain loop over query positions, written from DESIGN.md section 3
and the mixers' documented choices (module docstrings, `METHOD_DEFAULTS`). It imports
nothing from `linearize.kernels` or the mixers' internals: it reads the layer's projection
weights and new parameters and recomputes everything else itself (RoPE included). The
converted layer runs in fp32 on a tiny random GQA Llama (4 query heads, 2 KV heads, head
dim 16) after `perturb`, so a gate read from the wrong token, a per-head parameter read with
the wrong head, a wrong feature map or a wrong mixing rule changes the output.

Sequences are T=37 with window 8: longer than the window, not a multiple of the CPU chunk
(32) or sub-chunk (8); window=0 cases check the pure recurrent form. Lolcats is left out
here (being rewritten); its padding and packing behaviour is checked in
test_padding_packing.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

import linearize
from helpers.perturb import per_head_distinct, perturb

T, BATCH, WINDOW = 37, 2, 8
TOL = 1e-5  # relative error, fp32 layer vs fp64 reference


# --- the methods' documented settings (README table, DESIGN.md section 3, mixer docstrings) ----------


@dataclass(frozen=True)
class Spec:
    """What one method computes, spelled out for the reference (not read from the library)."""

    window: int
    feature_map: str  # "softmax" | "hgrn2" (softmax(q), k' = 1 - a) | "hedgehog" | "none"
    gate: str  # "liger" | "scalar" | "mamba2" | "none"
    mixing: str  # "fixed" | "learned" | "window-only" | "linear-only"
    normalize: bool
    linear_rope: bool
    sink_tokens: int = 0
    sink_logits: int = 0
    gate_normalizer: float = 16.0
    window_weight: float = 0.5
    linear_weight: float = 0.5


DOCUMENTED = {
    # Liger Attention: 0.5 SWA(RoPE) + 0.5 GLA; phi = softmax over the head dim on raw q, k;
    # log a = logsigmoid(k)/16 per channel; no normalizer.
    "liger-gla": Spec(64, "softmax", "liger", "fixed", False, False),
    # HGRN2: q = softmax(q), k' = 1 - a, log a = logsigmoid(k)/16 (our /16, see DESIGN.md).
    "liger-hgrn2": Spec(64, "hgrn2", "liger", "fixed", False, False),
    # Lizard: Hedgehog maps on raw q, k, scalar gate sigma(Wx+b) per KV head, normalized,
    # 128-token window with 4 meta-memory logits, learned per-head branch weights.
    "lizard": Spec(128, "hedgehog", "scalar", "learned", True, False, sink_logits=4),
    # Window + sinks: softmax over the first 4 tokens and the last 64.
    "window-sinks": Spec(64, "none", "none", "window-only", False, True, sink_tokens=4),
}


def spec_for(convert_kwargs: dict) -> Spec:
    """The documented spec of the method, with the fields the conversion overrides (window, gate,
    normalize); window=0 drops the window branch. share_state_across_group changes memory, not math."""
    fields = {"window", "gate", "normalize"}
    s = replace(DOCUMENTED[convert_kwargs["method"]], **{k: v for k, v in convert_kwargs.items() if k in fields})
    if s.window == 0:
        s = replace(s, mixing="linear-only", sink_tokens=0, sink_logits=0)
    return s


# --- the reference -----------------------------------------------------------------------------------


def rope_tables(T: int, D: int, theta: float):
    """cos, sin [T, D] in fp64 for positions 0..T-1 (Llama: frequencies theta^(-2i/D), halves repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Llama RoPE on x [T, heads, D]: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def hedgehog(x, W):
    """Hedgehog map of one head: [softmax(x W) ++ softmax(-x W)]."""
    z = x @ W
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)])


def reference_sequence(x, W, P, s: Spec, H: int, Hkv: int, D: int, theta: float):
    """One sequence x [T, C] (fp64) through the whole attention layer; returns [T, C].

    W: q, k, v, o projection weights; P: the new parameters by name (without layer prefix).
    GQA: query head h reads KV head h // (H / Hkv). The recurrence runs per state head: per KV
    head, or per query head when the layer holds one learned key map per query head (keys
    repeated to query heads first; the count is read from the map's shape). Parameter-free
    maps give the same math either way, so they run per KV head.
    Per state head:
        S_t = Diag(a_t) S_{t-1} + phi(k_t)^T v_t,  z_t = Diag(a_t) z_{t-1} + phi(k_t)
        o_lin = phi(q_t) S_t  (/ phi(q_t) z_t when normalized, floored at 1e-6)
    Window: softmax of RoPE'd q_t . k_j / sqrt(D) over keys j <= t with t - j < window or
    j < sink_tokens, plus exp(sink logit) terms that only enter the denominator.
    """
    Tn = x.shape[0]
    G = H // Hkv
    q = (x @ W["q"].T).view(Tn, H, D)
    k = (x @ W["k"].T).view(Tn, Hkv, D)
    v = (x @ W["v"].T).view(Tn, Hkv, D)
    cos, sin = rope_tables(Tn, D, theta)
    qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
    lq, lk = (qr, kr) if s.linear_rope else (q, k)
    linear = s.mixing != "window-only"

    def log_gate(t, g):
        if s.gate == "liger":  # per key channel, tiled over the feature width
            per_channel = F.logsigmoid(k[t, g]) / s.gate_normalizer
            return per_channel.repeat(feat_dim // D)
        if s.gate == "scalar":
            return F.logsigmoid(x[t] @ P["linearize_gate.proj.weight"][g] + P["linearize_gate.proj.bias"][g])
        if s.gate == "mamba2":
            dt = F.softplus(x[t] @ P["linearize_gate.dt_proj.weight"][g] + P["linearize_gate.dt_proj.bias"][g])
            return -torch.exp(P["linearize_gate.A_log"][g]) * dt
        return torch.zeros((), dtype=x.dtype)

    def phi_q(t, h):
        if s.feature_map == "hedgehog":
            return hedgehog(lq[t, h], P["linearize_feature_map_q.weight"][h])
        return torch.softmax(lq[t, h], -1)

    def phi_k(t, g, n):
        if s.feature_map == "hedgehog":  # the key map of state head n on KV head g's key
            return hedgehog(lk[t, g], P["linearize_feature_map_k.weight"][n])
        if s.feature_map == "hgrn2":
            return 1 - torch.exp(F.logsigmoid(k[t, g]) / s.gate_normalizer)
        return torch.softmax(lk[t, g], -1)

    feat_dim = 2 * D if s.feature_map == "hedgehog" else D
    n_state = P["linearize_feature_map_k.weight"].shape[0] if s.feature_map == "hedgehog" and linear else Hkv
    assert n_state in (H, Hkv)
    S = [x.new_zeros(feat_dim, D) for _ in range(n_state)]
    z = [x.new_zeros(feat_dim) for _ in range(n_state)]
    rows = []
    for t in range(Tn):
        if linear:
            for n in range(n_state):
                g = n * Hkv // n_state  # the KV head this state reads
                a = torch.exp(log_gate(t, g))
                fk = phi_k(t, g, n)
                a_col = a[:, None] if a.dim() else a
                S[n] = a_col * S[n] + torch.outer(fk, v[t, g])
                z[n] = a * z[n] + fk
        heads = []
        for h in range(H):
            g = h // G
            n = h * n_state // H  # the state head query head h reads
            o_win = o_lin = None
            if s.window > 0:
                keys = [j for j in range(t + 1) if t - j < s.window or j < s.sink_tokens]
                scores = torch.stack([qr[t, h] @ kr[j, g] for j in keys]) / math.sqrt(D)
                sinks = P["linearize_sink_logits"][h] if s.sink_logits else scores.new_zeros(0)
                m = torch.cat([scores, sinks]).max().detach()
                e = torch.exp(scores - m)
                den = e.sum() + torch.exp(sinks - m).sum()
                o_win = sum(e[i] * v[j, g] for i, j in enumerate(keys)) / den
            if linear:
                fq = phi_q(t, h)
                o_lin = fq @ S[n]
                if s.normalize:
                    o_lin = o_lin / torch.clamp_min(fq @ z[n], 1e-6)
            if s.mixing == "window-only":
                o = o_win
            elif s.mixing == "linear-only":
                o = o_lin
            elif s.mixing == "fixed":
                o = s.window_weight * o_win + s.linear_weight * o_lin
            elif s.mixing == "learned":
                o = P["linearize_window_weight"][h] * o_win + P["linearize_linear_weight"][h] * o_lin
            else:
                raise AssertionError(s.mixing)
            heads.append(o)
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ W["o"].T


# --- cases -------------------------------------------------------------------------------------------

CASES = {  # convert kwargs
    "liger-gla": dict(method="liger-gla", window=WINDOW),
    "liger-gla-recurrent": dict(method="liger-gla", window=0),
    "liger-gla-mamba2-per-query-state": dict(method="liger-gla", window=WINDOW, gate="mamba2",
                                             share_state_across_group=False),
    "liger-gla-scalar-normalized": dict(method="liger-gla", window=WINDOW, gate="scalar", normalize=True),
    "liger-hgrn2": dict(method="liger-hgrn2", window=WINDOW),
    "liger-hgrn2-recurrent": dict(method="liger-hgrn2", window=0),
    "lizard": dict(method="lizard", window=WINDOW),
    "lizard-recurrent": dict(method="lizard", window=0),
    "lizard-mamba2": dict(method="lizard", window=WINDOW, gate="mamba2"),
    "lizard-liger-gate-per-query-state": dict(method="lizard", window=WINDOW, gate="liger",
                                              share_state_across_group=False),
    "window-sinks": dict(method="window-sinks", window=WINDOW),
}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def converted_layer(make_tiny_model, kwargs, seed=0):
    # initializer_range 0.1: q . k / sqrt(D) of order 1, so the window's softmax is not flat
    model = make_tiny_model("llama", num_hidden_layers=1, initializer_range=0.1)
    linearize.convert(model, **kwargs)
    perturb(model, seed)
    return model, model.model.layers[0].self_attn


def test_perturb_is_deterministic_distinct_per_head_and_moves_every_new_parameter(make_tiny_model):
    """perturb: same seed, same values; another seed, other values; no parameter left at its
    initialisation; no two heads equal in any per-head parameter."""
    kwargs = dict(method="lizard", gate="mamba2", window=WINDOW)
    fresh = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), **kwargs)
    init = {n: p.detach().clone() for n, p in linearize.new_parameters(fresh)}
    a = perturb(fresh, 3)
    b = perturb(linearize.convert(make_tiny_model("llama", num_hidden_layers=2), **kwargs), 3)
    c = perturb(linearize.convert(make_tiny_model("llama", num_hidden_layers=2), **kwargs), 4)
    pa, pb, pc = (dict(linearize.new_parameters(m)) for m in (a, b, c))
    assert set(pa) == set(init) and len(pa) == 2 * 8  # maps q/k, dt weight/bias, A_log, sinks, 2 weights
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
        assert not torch.equal(pa[n], pc[n]), n
        assert not torch.equal(pa[n], init[n]), n
    assert per_head_distinct(a)


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_fp64_reference_forward_and_gradients(make_tiny_model, case):
    """The converted layer (fp32, chunked CPU kernels) equals the fp64 reference written from the
    paper equations: output, d/d hidden states, d/d each new parameter and d/d the q/k/v/o weights.

    Guards every per-method choice at once: feature maps, gate kind and the token and head
    it is read from, tiling of a per-channel gate over Hedgehog features, GQA head mapping,
    window extent and sinks, normalizer, mixing weights, RoPE only where documented."""
    kwargs = CASES[case]
    model, layer = converted_layer(make_tiny_model, kwargs)
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert (H, Hkv, D) == (4, 2, 16)
    theta = cfg.rope_parameters["rope_theta"]
    spec = spec_for(kwargs)

    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)

    # our cos/sin must be the model's own rotary embedding
    cos, sin = rope_tables(T, D, theta)
    m_cos, m_sin = model.model.rotary_emb(x64.float(), torch.arange(T)[None].expand(BATCH, T))
    assert rel(m_cos[0], cos) < 1e-6 and rel(m_sin[0], sin) < 1e-6

    # the layer, fp32
    x32 = x64.float().requires_grad_(True)
    emb = (cos.float()[None].expand(BATCH, T, D), sin.float()[None].expand(BATCH, T, D))
    out32 = layer(x32, position_embeddings=emb, attention_mask=None)[0]
    (out32.double() * weight).sum().backward()
    projections = {n: getattr(layer, f"{n}_proj").weight for n in "qkvo"}
    new = dict(layer.new_parameters())
    if spec.gate in ("scalar", "mamba2") or spec.feature_map == "hedgehog" or spec.sink_logits:
        assert new, "perturbed parameters expected"

    # the reference, fp64
    xr = x64.clone().requires_grad_(True)
    W = {n: w.detach().double().requires_grad_(True) for n, w in projections.items()}
    P = {n: p.detach().double().requires_grad_(True) for n, p in new.items()}
    ref = torch.stack([reference_sequence(xr[b], W, P, spec, H, Hkv, D, theta) for b in range(BATCH)])
    (ref * weight).sum().backward()

    assert rel(out32, ref) < TOL, f"output {rel(out32, ref):.2e}"
    assert rel(x32.grad, xr.grad) < TOL, f"d hidden {rel(x32.grad, xr.grad):.2e}"
    for n in projections:
        assert rel(projections[n].grad, W[n].grad) < TOL, f"d {n}_proj {rel(projections[n].grad, W[n].grad):.2e}"
    for n in new:
        assert rel(new[n].grad, P[n].grad) < TOL, f"d {n} {rel(new[n].grad, P[n].grad):.2e}"
