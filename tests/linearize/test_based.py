"""based: the Taylor feature map against its defining identity, the converted layer against an
fp64 reference written from Based's equations (scores, not features), padding, decoding, the
config rules and `linearize info`'s bytes."""
from __future__ import annotations

import math
import re

import pytest
import torch

import linearize
from helpers.perturb import perturb
from helpers.reference import rel, rope
from linearize import ConfigError, LinearizeCache, LinearizeConfig
from linearize.mixers.feature_maps import TaylorFeatureMap
from linearize.summary import summarize

T, BATCH, WINDOW, SINKS = 29, 2, 8, 4


@pytest.mark.parametrize("d", [16, 5])
def test_taylor_map_is_the_second_order_expansion_of_exp(d):
    """phi(q).phi(k) = 1 + s + s^2 / 2 with s = qW.kW / sqrt(d), per head, in fp64; the layout
    [1, y / d^(1/4), vec(y y^T) / sqrt(2 d)] and the width 1 + d + d^2 (273 for d = 16)."""
    H, D = 3, 12
    fmap = TaylorFeatureMap(H, D, None if d == 16 else d).double()
    assert fmap.out_dim == 1 + d + d * d and fmap.weight.shape == (H, D, d)
    with torch.no_grad():
        fmap.weight.normal_(0, 0.4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 7, H, D, generator=gen, dtype=torch.float64)
    fq, fk = fmap(q), fmap(k)
    assert fq.dtype == torch.float64 and fq.shape == (2, 7, H, 1 + d + d * d)
    yq, yk = (torch.einsum("bthd,hdf->bthf", x, fmap.weight) for x in (q, k))
    s = torch.einsum("bthf,bshf->bhts", yq, yk) / math.sqrt(d)
    assert rel(torch.einsum("bthf,bshf->bhts", fq, fk), 1 + s + s ** 2 / 2) < 1e-12
    assert torch.equal(fq[..., 0], torch.ones_like(fq[..., 0]))
    assert rel(fq[..., 1:1 + d], yq / d ** 0.25) < 1e-14
    assert rel(fq[..., 1 + d:].unflatten(-1, (d, d)), yq[..., :, None] * yq[..., None, :] / math.sqrt(2 * d)) < 1e-14


def reference(x, W, P, H, Hkv, D, theta, window, sinks):
    """One sequence x [T, C] through the layer, fp64, from scores: per query head h (KV head g)
    s_tj = (q_t Wq_h).(k_j Wk_g) / sqrt(d) on the raw q, k; o_lin = sum_j<=t (1 + s + s^2/2) v_j
    / sum_j<=t (1 + s + s^2/2); window softmax over RoPE'd keys within `window` or among the
    first `sinks`; o = w_win o_win + w_lin o_lin; o_proj."""
    Tn, G = x.shape[0], H // Hkv
    q, k, v = (x @ W["q"].T).view(Tn, H, D), (x @ W["k"].T).view(Tn, Hkv, D), (x @ W["v"].T).view(Tn, Hkv, D)
    qr, kr = rope(q, theta), rope(k, theta)
    Wq, Wk = P["linearize_feature_map_q.weight"], P["linearize_feature_map_k.weight"]
    d = Wq.shape[-1]
    rows = []
    for t in range(Tn):
        heads = []
        for h in range(H):
            g = h // G
            keys = [j for j in range(t + 1) if t - j < window or j < sinks]
            p = torch.softmax(torch.stack([qr[t, h] @ kr[j, g] for j in keys]) / math.sqrt(D), 0)
            o_win = sum(p[i] * v[j, g] for i, j in enumerate(keys))
            s = (k[:t + 1, g] @ Wk[g]) @ (q[t, h] @ Wq[h]) / math.sqrt(d)  # [t + 1]
            a = 1 + s + s ** 2 / 2
            o_lin = (a[:, None] * v[:t + 1, g]).sum(0) / a.sum()
            heads.append(P["linearize_window_weight"][h] * o_win + P["linearize_linear_weight"][h] * o_lin)
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ W["o"].T


def test_layer_matches_fp64_reference_forward_and_gradients(make_tiny_model):
    """T=29, window 8 + 4 sinks, GQA 4 over 2 heads, d = 16 (273 features), every new
    parameter perturbed: output and the gradients of the hidden states, q/k/v/o weights and
    every new parameter (the projections W and the branch weights)."""
    model = make_tiny_model("llama", num_hidden_layers=1, initializer_range=0.1)
    linearize.convert(model, method="based", window=WINDOW)
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
    assert set(new) == {"linearize_feature_map_q.weight", "linearize_feature_map_k.weight",
                        "linearize_window_weight", "linearize_linear_weight"}
    assert new["linearize_feature_map_q.weight"].shape == (H, D, 16)
    assert new["linearize_feature_map_k.weight"].shape == (Hkv, D, 16)
    xr = x64.clone().requires_grad_(True)
    W = {n: w.detach().double().requires_grad_(True) for n, w in projections.items()}
    P = {n: p.detach().double().requires_grad_(True) for n, p in new.items()}
    ref = torch.stack([reference(xr[b], W, P, H, Hkv, D, theta, WINDOW, SINKS) for b in range(BATCH)])
    (ref * weight).sum().backward()
    assert rel(out32, ref) < 1e-5
    assert rel(x32.grad, xr.grad) < 1e-5
    for n in projections:
        assert rel(projections[n].grad, W[n].grad) < 1e-5, n
    for n in new:
        assert rel(new[n].grad, P[n].grad) < 1e-5, n


def alone(model, ids):
    with torch.no_grad():
        return model(ids[None], position_ids=torch.arange(len(ids))[None], use_cache=False).logits[0]


DECODE_CASES = {
    "based": dict(method="based", window=6, num_sink_tokens=2),
    "based-recurrent-per-query-head": dict(method="based", window=0, share_state_across_group=False, feature_dim=5),
    "based-lightning-baseline": dict(method="based", window=5, gate="lightning", init="baseline"),
    "lolcats-taylor": dict(method="lolcats", window=5, feature_map="taylor", feature_dim=6),
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


def test_padding_inside_a_row_writes_nothing(make_tiny_model):
    """Pure recurrence (window 0): a row with padded steps in the middle equals its real tokens
    run alone (the Taylor map's constant feature 1 would otherwise add a pad's value to the
    state and 1 to the normalizer)."""
    model = perturb(linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="based", window=0), 0)
    ids = torch.randint(1, 128, (1, 16))
    mask = torch.ones_like(ids)
    mask[0, 6:8] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[0]
    real = mask[0].bool()
    assert rel(out[real], alone(model, ids[0, real])) < 1e-5


def test_config_defaults_and_refusals():
    c = LinearizeConfig(method="based").resolved()
    assert (c.window, c.num_sink_tokens, c.gate, c.feature_map, c.feature_dim, c.mixing, c.normalize,
            c.linear_rope) == (64, 4, "none", "taylor", None, "learned", True, False)
    b = LinearizeConfig(method="based", init="baseline").resolved()
    assert (b.mixing, b.window_weight, b.linear_weight) == ("learned", 1.0, 0.0)
    for bad, words in ((dict(method="based", feature_map="l2"), "'l2' is gated-deltanet's own"),
                       (dict(method="gated-deltanet", feature_map="taylor"), "'l2' is gated-deltanet's own"),
                       (dict(method="based", feature_map="none"), "based needs a feature map: softmax, hedgehog or taylor"),
                       (dict(method="based", gate="liger"), "method based supports gate in"),
                       (dict(method="based", feature_dim=0), "feature_dim must be a positive integer"),
                       (dict(method="based", feature_map="tailor"), "unknown feature_map 'tailor'")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            LinearizeConfig(**bad).resolved()


def test_liger_gate_on_taylor_features_is_refused_at_conversion(make_tiny_model):
    with pytest.raises(ValueError, match=re.escape("feature width 273 must be a multiple of head_dim 16")):
        linearize.convert(make_tiny_model("llama"), method="liger-gla", feature_map="taylor")


def test_info_bytes_equal_the_cache(make_tiny_model):
    """`linearize info`'s decode-state bytes: per layer the fp32 state and normalizer,
    Hkv x 273 x (D + 1), and the window's and sinks' keys and values; equal to what the cache
    holds after a prompt longer than the window."""
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=3), method="based", window=6,
                              num_sink_tokens=2)
    cfg = model.config
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    expected = 3 * (Hkv * 273 * (D + 1) * 4 + (6 - 1 + 2) * 2 * Hkv * D * 4)
    assert summarize(model, contexts=(40,)).state_bytes[40] == expected
    cache = LinearizeCache(model)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 40)), cache=cache)
    held = sum(t.nbytes for layer in cache.layers for name in layer._tensors()
               if (t := getattr(layer, name)) is not None and t.is_floating_point())
    assert held == expected


def test_cli_convert_and_info(make_tiny_model, tmp_path, capsys):
    """`linearize convert --method based` writes a model that reloads with its trained-to-be maps."""
    from linearize.cli import main

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    out = tmp_path / "out"
    main(["convert", str(src), "--out", str(out), "--method", "based", "--feature-dim", "4"])
    main(["info", str(out)])
    assert "method              based" in capsys.readouterr().out
    fmap = linearize.mixers(linearize.load(out))[0].linearize_feature_map_k
    assert fmap.out_dim == 1 + 4 + 16 and fmap.weight.shape == (2, 16, 4)


def test_triton_path_matches_torch_path(make_tiny_model, monkeypatch):
    """The GLA Triton kernel (interpreted on the CPU) on Taylor features: logits and gradients
    of the new parameters equal the PyTorch path's."""
    pytest.importorskip("triton")
    model = perturb(linearize.convert(make_tiny_model("llama"), method="based", window=5, feature_dim=3), 0)
    ids = torch.randint(0, 128, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs, grads = [], []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", backend)
        model.zero_grad()
        out = model(ids, attention_mask=mask, use_cache=False).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in linearize.new_parameters(model)})
    valid = mask.bool()
    assert rel(outs[1][valid], outs[0][valid]) < 1e-4
    for n, g in grads[0].items():
        assert rel(grads[1][n], g) < 1e-3, n
