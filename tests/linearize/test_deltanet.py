"""gated-deltanet: the converted layer against an fp64 reference written from the equations,
the config rules, and the window-covers-the-sequence check at the model level."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import linearize
from helpers.perturb import perturb
from helpers.reference import rel, rope
from linearize import ConfigError, LinearizeConfig

T, BATCH, WINDOW, SINKS = 37, 2, 8, 4


def reference(x, W, P, H, Hkv, D, theta, window):
    """One sequence x [T, C] through the layer, fp64, as a loop over tokens:
    S = a (I - beta k k^T) S + beta k v^T on L2-normalised raw q, k (per KV head), o_lin = q S;
    window softmax over RoPE'd keys within `window` or among the first SINKS; o = w_win o_win +
    w_lin o_lin per query head; then o_proj."""
    Tn, G = x.shape[0], H // Hkv
    q, k, v = (x @ W["q"].T).view(Tn, H, D), (x @ W["k"].T).view(Tn, Hkv, D), (x @ W["v"].T).view(Tn, Hkv, D)
    qr, kr = rope(q, theta), rope(k, theta)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.sigmoid(x @ P["linearize_beta.weight"].T + P["linearize_beta.bias"])  # [T, Hkv]
    dt = F.softplus(x @ P["linearize_gate.dt_proj.weight"].T + P["linearize_gate.dt_proj.bias"])
    a = torch.exp(-torch.exp(P["linearize_gate.A_log"]) * dt)  # [T, Hkv]
    S = [x.new_zeros(D, D) for _ in range(Hkv)]
    eye = torch.eye(D, dtype=x.dtype)
    rows = []
    for t in range(Tn):
        for g in range(Hkv):
            S[g] = a[t, g] * (eye - beta[t, g] * torch.outer(kn[t, g], kn[t, g])) @ S[g] \
                + beta[t, g] * torch.outer(kn[t, g], v[t, g])
        heads = []
        for h in range(H):
            g = h // G
            keys = [j for j in range(t + 1) if t - j < window or j < SINKS]
            p = torch.softmax(torch.stack([qr[t, h] @ kr[j, g] for j in keys]) / math.sqrt(D), 0)
            o_win = sum(p[i] * v[j, g] for i, j in enumerate(keys))
            o_lin = qn[t, h] @ S[g]
            heads.append(P["linearize_window_weight"][h] * o_win + P["linearize_linear_weight"][h] * o_lin)
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ W["o"].T


def test_layer_matches_fp64_reference_forward_and_gradients(make_tiny_model):
    """T=37, window 8, GQA 4 over 2 heads, every new parameter perturbed: output and the
    gradients of the hidden states, q/k/v/o weights and every new parameter."""
    model = make_tiny_model("llama", num_hidden_layers=1, initializer_range=0.1)
    linearize.convert(model, method="gated-deltanet", window=WINDOW)
    perturb(model, 0)
    layer, cfg = model.model.layers[0].self_attn, model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    x32 = x64.float().requires_grad_(True)
    emb = model.model.rotary_emb(x32, torch.arange(T)[None].expand(BATCH, T))
    out32 = layer(x32, position_embeddings=emb, attention_mask=None)[0]
    (out32.double() * weight).sum().backward()
    projections = {n: getattr(layer, f"{n}_proj").weight for n in "qkvo"}
    new = dict(layer.new_parameters())
    assert set(new) == {"linearize_beta.weight", "linearize_beta.bias", "linearize_gate.dt_proj.weight",
                        "linearize_gate.dt_proj.bias", "linearize_gate.A_log", "linearize_window_weight",
                        "linearize_linear_weight"}
    xr = x64.clone().requires_grad_(True)
    W = {n: w.detach().double().requires_grad_(True) for n, w in projections.items()}
    P = {n: p.detach().double().requires_grad_(True) for n, p in new.items()}
    ref = torch.stack([reference(xr[b], W, P, H, Hkv, D, theta, WINDOW) for b in range(BATCH)])
    (ref * weight).sum().backward()
    assert rel(out32, ref) < 1e-5
    assert rel(x32.grad, xr.grad) < 1e-5
    for n in projections:
        assert rel(projections[n].grad, W[n].grad) < 1e-5, n
    for n in new:
        assert rel(new[n].grad, P[n].grad) < 1e-5, n


def test_config_defaults_and_refusals():
    c = LinearizeConfig(method="gated-deltanet").resolved()
    assert (c.window, c.num_sink_tokens, c.gate, c.feature_map, c.mixing, c.normalize, c.linear_rope) == (
        64, 4, "mamba2", "l2", "learned", False, False)
    b = LinearizeConfig(method="gated-deltanet", init="baseline").resolved()
    assert (b.mixing, b.window_weight, b.linear_weight) == ("learned", 1.0, 0.0)
    for bad in (dict(method="gated-deltanet", feature_map="hedgehog"), dict(method="liger-gla", feature_map="l2"),
                dict(method="gated-deltanet", normalize=True), dict(method="gated-deltanet", gate="liger"),
                dict(method="gated-deltanet", mixing="shared-denominator")):
        with pytest.raises(ConfigError):
            LinearizeConfig(**bad).resolved()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_window_covering_the_sequence_with_linear_weight_zero_reproduces_the_teacher(make_tiny_model, family):
    """Every other new parameter perturbed (beta, gate): with the window over the whole sequence
    and the branch weights at 1 / 0 the model is the teacher, padding included."""
    model = make_tiny_model(family)
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    linearize.convert(model, method="gated-deltanet", window=24, num_sink_tokens=0)
    perturb(model, 0)
    with torch.no_grad():
        for m in linearize.mixers(model):
            m.linearize_window_weight.fill_(1.0)
            m.linearize_linear_weight.zero_()
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(out[real], ref[real]) < 1e-5
