"""Head-level hybrid (`LinearizeConfig.full_attention_heads`, DuoAttention-style): kept KV heads
run exact causal softmax over every key, the others the unchanged hybrid.

An fp64 reference from the definition (per head: softmax over all keys for kept heads, the
naive hybrid kernel for the others), parity with the teacher (every head kept) and with
today's model (none kept), decode == full forward, save/load, bad configs, byte counts and
gradients.
"""
from __future__ import annotations

import math

import pytest
import torch

import linearize
from helpers.perturb import perturb
from helpers.reference import rel, rope
from helpers.threads import one_thread  # noqa: F401
from linearize import LinearizeCache, LinearizeConfig
from linearize.config import ConfigError
from linearize.kernels.hybrid.naive import naive_hybrid_attention
from linearize.state import linearize_state
from linearize.summary import summarize

T = 20


def converted(make_tiny_model, num_layers=2, **config):
    model = make_tiny_model("llama", num_hidden_layers=num_layers, initializer_range=0.1)
    linearize.convert(model, **config)
    return perturb(model, seed=3)


def test_mixer_matches_an_fp64_reference_from_the_definition(make_tiny_model):
    """liger-gla, window 5, KV head 1 kept (query heads 2, 3); 4 query / 2 KV heads."""
    model = converted(make_tiny_model, method="liger-gla", window=5, full_attention_heads={0: [1]}).double()
    mixer = linearize.mixers(model)[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, 64, generator=gen, dtype=torch.float64)
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        heads, _ = mixer.student_forward(x, (cos, sin), None)
        D, theta = mixer.head_dim, model.config.rope_theta if hasattr(model.config, "rope_theta") else \
            model.config.rope_parameters["rope_theta"]
        q = (x[0] @ mixer.q_proj.weight.T).view(T, 4, D)
        k = (x[0] @ mixer.k_proj.weight.T).view(T, 2, D)
        v = (x[0] @ mixer.v_proj.weight.T).view(T, 2, D)
        q_rot, k_rot = rope(q, theta), rope(k, theta)
        expected = torch.empty(T, 4, D, dtype=torch.float64)
        for h in (2, 3):  # kept: softmax over every past key, from the definition
            for i in range(T):
                s = torch.stack([q_rot[i, h] @ k_rot[j, 1] / math.sqrt(D) for j in range(i + 1)])
                expected[i, h] = (torch.softmax(s, 0)[:, None] * v[: i + 1, 1]).sum(0)
        lin_q, lin_k = (q_rot, k_rot) if mixer.lconfig.linear_rope else (q, k)
        fq, fk, g = mixer.linear_inputs(x, lin_q[None], lin_k[None], k[None])
        hybrid = naive_hybrid_attention(q_rot[None], k_rot[None], v[None], fq, fk, g, window=5, mode="mix",
                                        scale_win=1 / math.sqrt(D), w_win=0.5, w_lin=0.5)[0][0]
        expected[:, :2] = hybrid[:, :2]
    # transformers builds RoPE's cos/sin from fp32 frequencies even in an fp64 model: ~1e-8 apart
    assert rel(heads[0], expected) < 1e-6
    assert rel(hybrid[:, 2:], expected[:, 2:]) > 1e-2  # the kept heads really left the hybrid


@pytest.mark.parametrize("config", [LinearizeConfig.recommended(window=6).to_dict(),
                                    dict(method="liger-gla", window=6)], ids=["recommended", "liger-gla"])
def test_every_head_kept_is_the_teacher(make_tiny_model, config):
    model = converted(make_tiny_model, num_layers=3, **{**config, "full_attention_heads": {i: [0, 1] for i in range(3)}})
    ids = torch.randint(1, 128, (2, 32))
    with torch.no_grad():
        with linearize.teacher(model):
            ref = model(ids).logits
        out = model(ids).logits
    assert rel(out, ref) < 1e-5


def test_no_heads_kept_is_todays_model_bit_for_bit(make_tiny_model):
    torch.manual_seed(1)
    today = converted(make_tiny_model, method="lolcats", window=6, num_sink_tokens=2, gate="mamba2")
    torch.manual_seed(1)
    empty = converted(make_tiny_model, method="lolcats", window=6, num_sink_tokens=2, gate="mamba2",
                      full_attention_heads={})
    torch.manual_seed(1)
    kept = converted(make_tiny_model, method="lolcats", window=6, num_sink_tokens=2, gate="mamba2",
                     full_attention_heads={1: [0]})
    ids = torch.randint(1, 128, (2, 30))
    x = torch.randn(2, 30, 64)
    pos = torch.arange(30)[None]
    with torch.no_grad():
        assert torch.equal(today(ids).logits, empty(ids).logits)
        emb = today.model.rotary_emb(x, pos)
        a, _ = linearize.mixers(today)[1].student_forward(x, emb, None)
        b, _ = linearize.mixers(kept)[1].student_forward(x, emb, None)
    assert torch.equal(a[:, :, 2:], b[:, :, 2:])  # KV head 1's query heads: the unchanged hybrid
    assert not torch.allclose(a[:, :, :2], b[:, :, :2])


CHUNKS = (9, 1, 1, 2, 3, 1, 5, 1)


@pytest.mark.parametrize("config", [LinearizeConfig.recommended(window=4, sparse_cache=3, sparse_block=4).to_dict(),
                                    dict(method="liger-gla", window=4, num_sink_tokens=1)],
                         ids=["recommended-sparse", "liger-gla-sinks"])
def test_decode_step_by_step_equals_the_full_forward(make_tiny_model, config):
    """Kept heads in two layers, left padding, chunks of 1..5 tokens after a prefill."""
    model = converted(make_tiny_model, num_layers=3, **{**config, "full_attention_heads": {0: [1], 2: [0]}})
    n = sum(CHUNKS)
    ids = torch.randint(1, 128, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    bounds = [0]
    for c in CHUNKS:
        bounds.append(bounds[-1] + c)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        pieces = [model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache).logits
                  for a, b in zip(bounds, bounds[1:])]
    got = torch.cat(pieces, 1)
    assert rel(got[0], full[0]) < 1e-5
    assert rel(got[1, 3:], full[1, 3:]) < 1e-5
    assert cache.layers[0].full_k.shape == (2, n, 1, 16)
    assert cache.layers[1].full_k is None


def test_generate_with_kept_heads_matches_greedy_full_forward(make_tiny_model):
    model = converted(make_tiny_model, method="liger-gla", window=4, full_attention_heads={1: [0, 1]})
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_saved_folder_round_trips_the_choice(make_tiny_model, tmp_path):
    model = converted(make_tiny_model, method="liger-gla", window=4, full_attention_heads={0: [1], 1: [0, 1]})
    model.save_pretrained(tmp_path)
    again = linearize.load(tmp_path)
    cfg = linearize_state(again).config
    assert cfg.full_attention_heads == {0: [1], 1: [0, 1]}
    assert [m.full_heads for m in linearize.mixers(again)] == [[1], [0, 1]]
    ids = torch.randint(1, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("value, words", [
    ({0: [0, 0]}, "lists a head twice"),
    ({0: []}, "non-empty list"),
    ({-1: [0]}, "not a non-negative layer index"),
    ({0: ["a"]}, "non-negative KV-head"),
    ([0, 1], "must be a dict"),
])
def test_bad_choices_name_the_field_and_the_fix(value, words):
    with pytest.raises(ConfigError, match=words):
        LinearizeConfig(method="liger-gla", full_attention_heads=value)


def test_choices_against_the_model_are_refused_before_conversion(make_tiny_model):
    with pytest.raises(ConfigError, match="out of range: the model has 2 layers"):
        linearize.convert(make_tiny_model("llama"), method="liger-gla", full_attention_heads={5: [0]})
    with pytest.raises(ConfigError, match="the model has 2 .*KV heads|has 2 \\(0..1\\)"):
        linearize.convert(make_tiny_model("llama"), method="liger-gla", full_attention_heads={0: [2]})
    with pytest.raises(ConfigError, match="softmax_layers"):
        LinearizeConfig(method="liger-gla", softmax_layers=[1], full_attention_heads={1: [0]})
    with pytest.raises(ConfigError, match="not linearized"):
        LinearizeConfig(method="liger-gla", layers=[0], full_attention_heads={1: [0]})
    model = make_tiny_model("llama")
    with pytest.raises(ConfigError):
        linearize.convert(model, method="liger-gla", full_attention_heads={0: [3]})
    assert not linearize.is_linearized(model)


def test_kept_heads_kv_bytes_are_counted(make_tiny_model):
    plain = converted(make_tiny_model, method="liger-gla", window=4)
    kept = converted(make_tiny_model, method="liger-gla", window=4, full_attention_heads={0: [1], 1: [0, 1]})
    per_token = 3 * 2 * 16 * 4  # 3 kept KV heads x (k + v) x head dim x fp32
    a, b = summarize(plain, contexts=(1024,)), summarize(kept, contexts=(1024,))
    assert b.state_bytes[1024] - a.state_bytes[1024] == per_token * 1024
    assert "3 KV heads" in str(b)
    cache = LinearizeCache(kept)
    with torch.no_grad():
        kept(torch.randint(1, 128, (1, 10)), cache=cache)
    assert sum(layer.full_k.nbytes + layer.full_v.nbytes for layer in cache.layers) == per_token * 10


def test_kept_heads_train_as_the_teachers_attention(make_tiny_model):
    """Every head kept: the loss's gradients on q, k, v equal the teacher's."""
    model = converted(make_tiny_model, method="liger-gla", window=4, full_attention_heads={0: [0, 1], 1: [0, 1]})
    model.train()
    ids = torch.randint(1, 128, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "_proj" in n and "self_attn" in n])

    student = grads()
    with linearize.teacher(model):
        teacher = grads()
    assert student.abs().sum() > 0
    assert rel(student, teacher) < 1e-4
