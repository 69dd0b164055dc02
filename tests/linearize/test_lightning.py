"""lightning: the `lightning` gate's decay against ALiBi's slopes and the depth rule, the
converted layer against an fp64 reference written from the equations, padding, decoding, the
config rules and `linearize info`'s bytes."""
from __future__ import annotations

import math

import pytest
import torch

import linearize
from helpers.perturb import perturb
from helpers.reference import rel, rope
from linearize import ConfigError, LinearizeCache, LinearizeConfig
from linearize.mixers.gates import alibi_slopes, lightning_log_decay
from linearize.summary import summarize

T, BATCH, WINDOW, SINKS = 29, 2, 8, 4


@pytest.mark.parametrize("n, exponents", [(1, [8]), (2, [4, 8]), (3, [4, 8, 2]), (4, [2, 4, 6, 8]),
                                          (6, [2, 4, 6, 8, 1, 3]), (8, [1, 2, 3, 4, 5, 6, 7, 8]),
                                          (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5])])
def test_slopes_are_alibis(n, exponents):
    """ALiBi's table: 2^(-8 i / n) for a power of two; else the power below, then every other
    slope of twice that power."""
    assert alibi_slopes(n) == pytest.approx([2.0 ** -e for e in exponents], rel=1e-12)


def test_decay_scales_with_depth():
    s = alibi_slopes(4)
    assert lightning_log_decay(4, 0, 5) == pytest.approx([-x * (1 + 1e-5) for x in s], rel=1e-12)
    assert lightning_log_decay(4, 2, 5) == pytest.approx([-x * (0.5 + 1e-5) for x in s], rel=1e-12)
    assert lightning_log_decay(4, 4, 5) == pytest.approx([-x * 1e-5 for x in s], rel=1e-12)
    assert lightning_log_decay(4, 0, 1) == pytest.approx([-x * (1 + 1e-5) for x in s], rel=1e-12)


def reference(x, W, H, Hkv, D, theta, window, sinks, log_decay, w_win, w_lin, normalize):
    """One sequence x [T, C] through the layer, fp64, as a loop over tokens: per KV head
    S = lambda S + phi(k)^T v, z = lambda z + phi(k) with phi = softmax over the head dimension
    on the raw q, k; o_lin = phi(q) S (/ phi(q) z when normalized); window softmax over RoPE'd
    keys within `window` or among the first `sinks`; o = w_win o_win + w_lin o_lin; o_proj."""
    Tn, G = x.shape[0], H // Hkv
    q, k, v = (x @ W["q"].T).view(Tn, H, D), (x @ W["k"].T).view(Tn, Hkv, D), (x @ W["v"].T).view(Tn, Hkv, D)
    qr, kr = rope(q, theta), rope(k, theta)
    fq, fk = torch.softmax(q, -1), torch.softmax(k, -1)
    lam = [math.exp(a) for a in log_decay]
    S = [x.new_zeros(D, D) for _ in range(Hkv)]
    z = [x.new_zeros(D) for _ in range(Hkv)]
    rows = []
    for t in range(Tn):
        for g in range(Hkv):
            S[g] = lam[g] * S[g] + torch.outer(fk[t, g], v[t, g])
            z[g] = lam[g] * z[g] + fk[t, g]
        heads = []
        for h in range(H):
            g = h // G
            keys = [j for j in range(t + 1) if t - j < window or j < sinks]
            p = torch.softmax(torch.stack([qr[t, h] @ kr[j, g] for j in keys]) / math.sqrt(D), 0)
            o_win = sum(p[i] * v[j, g] for i, j in enumerate(keys))
            o_lin = fq[t, h] @ S[g]
            if normalize:
                o_lin = o_lin / (fq[t, h] @ z[g])
            heads.append(w_win[h] * o_win + w_lin[h] * o_lin)
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ W["o"].T


@pytest.mark.parametrize("fields", [{}, dict(normalize=False), dict(mixing="learned")],
                         ids=["preset", "unnormalized-fused", "learned"])
def test_layer_matches_fp64_reference_forward_and_gradients(make_tiny_model, fields):
    """T=29, window 8 + 4 sinks, GQA 4 over 2 heads, the middle layer of 3 (decay at half the
    slopes): output and the gradients of the hidden states and q/k/v/o weights. The
    unnormalized variant runs the fused hybrid op, the others the separate branches."""
    model = make_tiny_model("llama", num_hidden_layers=3, initializer_range=0.1)
    linearize.convert(model, method="lightning", window=WINDOW, **fields)
    layer, cfg = model.model.layers[1].self_attn, model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if "mixing" in fields:
        perturb(model, 0)
        w_win = layer.linearize_window_weight.detach().double()
        w_lin = layer.linearize_linear_weight.detach().double()
    else:
        assert layer.new_parameters() == []
        w_win = w_lin = torch.full((H,), 0.5, dtype=torch.float64)
    log_decay = [-s * (0.5 + 1e-5) for s in (2.0 ** -4, 2.0 ** -8)]  # ALiBi for 2 state heads, layer 1 of 3
    theta = cfg.rope_parameters["rope_theta"]
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(BATCH, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    x32 = x64.float().requires_grad_(True)
    emb = model.model.rotary_emb(x32, torch.arange(T)[None].expand(BATCH, T))
    out32 = layer(x32, position_embeddings=emb, attention_mask=None)[0]
    (out32.double() * weight).sum().backward()
    projections = {n: getattr(layer, f"{n}_proj").weight for n in "qkvo"}
    xr = x64.clone().requires_grad_(True)
    W = {n: w.detach().double().requires_grad_(True) for n, w in projections.items()}
    normalize = fields.get("normalize", True)
    ref = torch.stack([reference(xr[b], W, H, Hkv, D, theta, WINDOW, SINKS, log_decay, w_win, w_lin, normalize)
                       for b in range(BATCH)])
    (ref * weight).sum().backward()
    assert rel(out32, ref) < 1e-5
    assert rel(x32.grad, xr.grad) < 1e-5
    for n in projections:
        assert rel(projections[n].grad, W[n].grad) < 1e-5, n


def alone(model, ids):
    with torch.no_grad():
        return model(ids[None], position_ids=torch.arange(len(ids))[None], use_cache=False).logits[0]


def test_padding_inside_a_row_decays_nothing(make_tiny_model):
    """Pure recurrence (window 0): a row with two padded steps in the middle equals its real
    tokens run alone, so a pad neither writes into the state nor decays it (a decay applied
    there would shrink the state by lambda^2 before the rest of the row)."""
    model = make_tiny_model("llama", num_hidden_layers=2)
    linearize.convert(model, method="lightning", window=0)
    ids = torch.randint(1, 128, (1, 16))
    mask = torch.ones_like(ids)
    mask[0, 6:8] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[0]
    real = mask[0].bool()
    ref = alone(model, ids[0, real])
    assert rel(out[real], ref) < 1e-5
    # the check can fail: the same tokens with the pads read as real tokens differ
    assert rel(alone(model, ids[0])[8:], ref[6:]) > 1e-3


DECODE_CASES = {
    "lightning": dict(method="lightning", window=6, num_sink_tokens=2),
    "lightning-recurrent-per-query-head": dict(method="lightning", window=0, share_state_across_group=False),
    "liger-gla-lightning": dict(method="liger-gla", window=6, gate="lightning"),
    "lizard-lightning": dict(method="lizard", window=5, gate="lightning"),
    "lolcats-lightning": dict(method="lolcats", window=5, gate="lightning", init="baseline"),
    "lolcats-lightning-sparse-cache": dict(method="lolcats", window=4, num_sink_tokens=1, gate="lightning",
                                           init="baseline", sparse_cache=3, sparse_block=4),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_left_padded_prefill_and_decode_equal_each_sequence_alone(make_tiny_model, case):
    """Left-padded rows (pads 0, 3, 11 of 22), full forward and prefill of 9 + one-token steps,
    against each sequence run alone; new parameters perturbed."""
    model = perturb(linearize.convert(make_tiny_model("llama", num_hidden_layers=3), **DECODE_CASES[case]), 0)
    pads, Tn, prefill = (0, 3, 11), 22, 9
    ids = torch.randint(1, 128, (len(pads), Tn))
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                       cache=cache).logits]
        for t in range(prefill, Tn):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               cache=cache).logits)
    decoded = torch.cat(steps, 1)
    for row, p in enumerate(pads):
        ref = alone(model, ids[row, p:])
        assert rel(full[row, p:], ref) < 1e-5, row
        assert rel(decoded[row, p:], ref) < 1e-5, row


def test_per_query_head_state_takes_the_query_heads_slopes(make_tiny_model):
    """share_state_across_group=False: one slope per query head (ALiBi for H = 4), not the KV
    heads' repeated."""
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=1), method="lightning",
                              share_state_across_group=False)
    gate = model.model.layers[0].self_attn.linearize_gate
    g = gate(torch.zeros(2, 3, 64), None)
    assert g.shape == (2, 3, 4) and g.dtype == torch.float32
    assert g[1, 2].tolist() == pytest.approx([-(2.0 ** -e) * (1 + 1e-5) for e in (2, 4, 6, 8)], rel=1e-6)


def test_config_defaults_and_refusals():
    c = LinearizeConfig(method="lightning").resolved()
    assert (c.window, c.num_sink_tokens, c.gate, c.feature_map, c.mixing, c.normalize, c.linear_rope) == (
        64, 4, "lightning", "softmax", "fixed", True, False)
    b = LinearizeConfig(method="lightning", init="baseline").resolved()
    assert (b.mixing, b.window_weight, b.linear_weight) == ("learned", 1.0, 0.0)
    for ok in ("liger-gla", "lizard", "lolcats"):
        assert LinearizeConfig(method=ok, gate="lightning").resolved().gate == "lightning"
    for bad, words in ((dict(method="lightning", gate="mamba2"), "method lightning supports gate in (lightning)"),
                       (dict(method="liger-hgrn2", gate="lightning"), "liger-hgrn2 supports gate in (liger)"),
                       (dict(method="gated-deltanet", gate="lightning"), "gated-deltanet supports gate in"),
                       (dict(method="lightning", gate="lightening"), "unknown gate 'lightening'"),
                       (dict(method="lightning", feature_map="l2"), "'l2' is gated-deltanet's own")):
        with pytest.raises(ConfigError, match=re_escape(words)):
            LinearizeConfig(**bad).resolved()


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_info_bytes_equal_the_cache(make_tiny_model):
    """`linearize info`'s decode-state bytes: per layer the fp32 state and normalizer
    Hkv x D x (D + 1) (no gate state: the decay is a constant) and the window's and sinks' keys
    and values; equal to what the cache holds after a prompt longer than the window."""
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=3), method="lightning", window=6,
                              num_sink_tokens=2)
    cfg = model.config
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    expected = 3 * (Hkv * D * (D + 1) * 4 + (6 - 1 + 2) * 2 * Hkv * D * 4)
    assert summarize(model, contexts=(40,)).state_bytes[40] == expected
    cache = LinearizeCache(model)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 40)), cache=cache)
    held = sum(t.nbytes for layer in cache.layers for name in layer._tensors()
               if (t := getattr(layer, name)) is not None and t.is_floating_point())
    assert held == expected


def test_cli_convert_and_info(make_tiny_model, tmp_path, capsys):
    """`linearize convert --method lightning` writes a model that `linearize info` describes."""
    from linearize.cli import main

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    out = tmp_path / "out"
    main(["convert", str(src), "--out", str(out), "--method", "lightning", "--window", "8"])
    main(["info", str(out)])
    text = capsys.readouterr().out
    assert "method              lightning" in text
    reloaded = linearize.load(out)
    assert linearize.mixers(reloaded)[0].linearize_gate.log_decay == pytest.approx(
        [-s * (1 + 1e-5) for s in (2.0 ** -4, 2.0 ** -8)], rel=1e-12)


@pytest.mark.parametrize("fields", [{}, dict(normalize=False)], ids=["preset", "unnormalized-fused"])
def test_triton_path_matches_torch_path(make_tiny_model, monkeypatch, fields):
    """The Triton kernels (interpreted on the CPU) with the constant per-head log gate: the GLA
    kernel beside the window op (preset), the fused hybrid kernel (unnormalized); logits and
    the gradients of q/k/v/o equal the PyTorch path's."""
    pytest.importorskip("triton")
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="lightning", window=5,
                              num_sink_tokens=2, **fields)
    ids = torch.randint(0, 128, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    attn = model.model.layers[1].self_attn
    params = {n: getattr(attn, f"{n}_proj").weight for n in "qkvo"}
    outs, grads = [], []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", backend)
        model.zero_grad()
        out = model(ids, attention_mask=mask, use_cache=False).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in params.items()})
    valid = mask.bool()
    assert rel(outs[1][valid], outs[0][valid]) < 1e-4
    for n, g in grads[0].items():
        assert rel(grads[1][n], g) < 1e-3, n
