"""Decoding parity: prefill + step-by-step decode must equal one full forward."""
import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize import LinearizeCache

CASES = {
    "liger-gla": dict(method="liger-gla", window=6),
    "liger-hgrn2": dict(method="liger-hgrn2", window=6),
    "lizard": dict(method="lizard", window=6),
    "lolcats": dict(method="lolcats", window=6),
    "lolcats-sinks-gate-baseline": dict(method="lolcats", window=6, num_sink_tokens=2, gate="scalar", init="baseline"),
    "lolcats-norope": dict(method="lolcats", window=6, num_sink_tokens=2, gate="mamba2", init="baseline",
                           linear_rope=False),
    "lolcats-norope-shared-state": dict(method="lolcats", window=5, linear_rope=False, share_state_across_group=True),
    "lolcats-shared-state": dict(method="lolcats", window=5, share_state_across_group=True, num_sink_tokens=1),
    "lolcats-sparse-cache": dict(method="lolcats", window=4, num_sink_tokens=1, gate="mamba2", init="baseline",
                                 sparse_cache=3, sparse_block=4),
    "lolcats-sparse-cache-per-kv-head": dict(method="lolcats", window=4, num_sink_tokens=1, gate="mamba2",
                                             init="baseline", linear_rope=False, sparse_cache=2, sparse_block=3,
                                             sparse_per_kv_head=True),
    "lolcats-sparse-cache-shared": dict(method="lolcats", window=3, share_state_across_group=True, sparse_cache=2,
                                        sparse_block=5),
    "liger-gla-baseline": dict(method="liger-gla", window=6, init="baseline"),
    "window-sinks": dict(method="window-sinks", window=6, num_sink_tokens=2),
    "liger-gla-recurrent": dict(method="liger-gla", window=0, gate="mamba2"),
    "gated-deltanet": dict(method="gated-deltanet", window=6, num_sink_tokens=2),
    "gated-deltanet-recurrent": dict(method="gated-deltanet", window=0, share_state_across_group=False),
    "hybrid-lizard": dict(method="lizard", window=5, softmax_layers=[1]),
}


def padded_batch(T=26, pads=(0, 3, 8)):
    ids = torch.randint(1, 128, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def convert(make_tiny_model, case):
    """The case's model with every new parameter moved off its initial value, per head, so
    that a parameter applied to the wrong head or token cannot pass."""
    model = make_tiny_model("llama", num_hidden_layers=3)
    linearize.convert(model, **CASES[case])
    with torch.no_grad():
        for _, p in linearize.new_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_full_forward(make_tiny_model, case):
    model = convert(make_tiny_model, case)
    ids, mask = padded_batch()
    pos = positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        P = 9
        outs = [model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], cache=cache).logits]
        for t in range(P, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              cache=cache).logits)
    step = torch.cat(outs, dim=1)
    valid = mask.bool()
    assert rel(step[valid], full[valid]) < 1e-4


@pytest.mark.parametrize("case", ["lizard", "window-sinks", "hybrid-lizard", "lolcats-sparse-cache",
                                  "lolcats-sparse-cache-per-kv-head"])
@pytest.mark.parametrize("query_block", [256, 3])
def test_prefill_in_pieces_equals_prefill_at_once(make_tiny_model, case, query_block, monkeypatch):
    """query_block 3: a piece meeting a cached window goes in blocks of 3 queries, each seeing only
    its own window of the new keys (plus sinks), and still equals the one-piece prefill."""
    import linearize.kernels.window.cached

    monkeypatch.setattr(linearize.kernels.window.cached, "QUERY_BLOCK", query_block)
    model = convert(make_tiny_model, case)
    ids, mask = padded_batch(T=30)
    pos = positions(mask)
    with torch.no_grad():
        whole_cache = LinearizeCache(model)
        whole = model(ids, attention_mask=mask, position_ids=pos, cache=whole_cache).logits
        cache = LinearizeCache(model)
        pieces = [model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache).logits
                  for a, b in ((0, 7), (7, 19), (19, 30))]
        nxt = torch.randint(1, 128, (3, 1))
        m2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        p2 = positions(m2)[:, -1:]
        after_whole = model(nxt, attention_mask=m2, position_ids=p2, cache=whole_cache).logits
        after_pieces = model(nxt, attention_mask=m2, position_ids=p2, cache=cache).logits
    valid = mask.bool()
    assert rel(torch.cat(pieces, 1)[valid], whole[valid]) < 1e-4
    assert rel(after_pieces, after_whole) < 1e-4


@pytest.mark.parametrize("case", ["liger-gla", "lolcats", "window-sinks", "hybrid-lizard"])
def test_greedy_generate_with_cache_matches_recompute(make_tiny_model, case):
    model = convert(make_tiny_model, case)
    ids, mask = padded_batch(T=12)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False,
                                    pad_token_id=0)
    assert torch.equal(cached, recomputed)


def test_generate_uses_the_linearize_cache(make_tiny_model):
    model = convert(make_tiny_model, "lizard")
    ids = torch.randint(1, 128, (1, 10))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.cache if hasattr(out, "cache") else out.past_key_values, LinearizeCache)


def test_beam_search_matches_without_cache(make_tiny_model):
    model = convert(make_tiny_model, "hybrid-lizard")
    ids = torch.randint(1, 128, (2, 9))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_sampling_and_stopping_run(make_tiny_model):
    model = convert(make_tiny_model, "liger-gla")
    ids = torch.randint(1, 128, (2, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, pad_token_id=0, eos_token_id=3)
    assert out.shape[0] == 2 and 5 < out.shape[1] <= 11


def test_linearized_cache_memory_is_constant(make_tiny_model):
    model = convert(make_tiny_model, "hybrid-lizard")
    layer_bytes = []
    with torch.no_grad():
        for T in (100, 1000):
            cache = LinearizeCache(model)
            model(torch.randint(1, 128, (1, T)), cache=cache)
            layer_bytes.append(cache.layers[0].nbytes())
    assert layer_bytes[0] == layer_bytes[1] > 0
    # the softmax-kept layer (1) grows like an ordinary KV cache
    assert cache.layers[1].keys.shape[-2] == 1000


def test_teacher_mode_generates_with_an_ordinary_kv_cache(make_tiny_model):
    base = make_tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(1, 128, (1, 8))
    with torch.no_grad():
        ref = base.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        linearize.convert(base, method="liger-gla")
        with linearize.teacher(base):
            out = base.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, DynamicCache) and not isinstance(cache, LinearizeCache)


def test_mixer_accepts_both_cache_argument_names(make_tiny_model):
    """transformers 5.2x renamed the attention's cache argument; both names must work."""
    model = convert(make_tiny_model, "lizard")
    mixer = model.model.layers[0].self_attn
    hidden = torch.randn(1, 7, 64)
    pos = torch.arange(7)[None]
    emb = model.model.rotary_emb(hidden, pos)
    outs = []
    for name in ("cache", "past_key_values"):
        cache = LinearizeCache(model)
        with torch.no_grad():
            outs.append(mixer(hidden, position_embeddings=emb, attention_mask=None, **{name: cache})[0])
        assert cache.layers[0].get_seq_length() == 7 and cache.layers[0].recurrent is not None
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["lolcats", "lolcats-sinks-gate-baseline", "lolcats-norope", "liger-gla", "lizard",
                                  "gated-deltanet"])
def test_reported_state_bytes_equal_the_cache(make_tiny_model, case):
    """`linearize info`'s decode-state bytes are what the cache holds after a long prompt
    (keys, values and states, a tensor the layers share once; the one-byte validity flags and
    token counts left out)."""
    from linearize.summary import summarize

    model = convert(make_tiny_model, case)
    cache = LinearizeCache(model)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 40)), past_key_values=cache, use_cache=True)
    held = {id(t): t for layer in cache.layers for name in layer._tensors()
            if (t := getattr(layer, name)) is not None and t.is_floating_point()}
    assert sum(t.nbytes for t in held.values()) == summarize(model, contexts=(40,)).state_bytes[40]


@pytest.mark.parametrize("sparse_cache", [0, 3])
def test_the_layers_keep_one_rotation(make_tiny_model, sparse_cache):
    """With the feature map before RoPE every layer's state keeps its keys' rotation, the same
    in each layer: the cache holds it once (one tensor, counted once), through prefill, decode
    and a beam reorder; `linearize info` counts it once too."""
    from linearize.summary import layer_state_bytes, summarize

    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=3), method="lolcats", window=4,
                              linear_rope=False, sparse_cache=sparse_cache, sparse_block=3)
    rotation = (lambda layer: layer.win_rope) if not sparse_cache else (lambda layer: layer.sparse["recent_rope"])
    ids = torch.randint(1, 128, (2, 30))
    cache = LinearizeCache(model)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        for t in range(20, 30):
            model(ids[:, t:t + 1], cache=cache)
            assert all(rotation(layer) is rotation(cache.layers[0]) for layer in cache.layers)
        cache.reorder_cache(torch.tensor([1, 1]))
    assert all(rotation(layer) is rotation(cache.layers[0]) for layer in cache.layers)
    one = rotation(cache.layers[0]).nbytes
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) - 2 * one
    info = summarize(model, contexts=(30,)).state_bytes[30]
    mixer = linearize.mixers(model)[0]
    assert mixer.rotation_state_bytes() > 0
    assert info == 3 * layer_state_bytes(mixer) + mixer.rotation_state_bytes()


def test_gemma3_keeps_one_rotation_per_rope(make_tiny_model):
    """Gemma-3's local and global layers rotate by different RoPE: the cache keeps one copy of
    each, never the one for the other, the decode matches the full forward, and `linearize
    info` counts the two copies."""
    from linearize.summary import summarize

    model = make_tiny_model("gemma3_text", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    linearize.convert(model, method="lolcats", window=4, linear_rope=False, layers=[0, 1, 2, 3])
    types = model.config.layer_types
    assert len(set(types)) == 2
    ids = torch.randint(1, 128, (1, 16))
    cache = LinearizeCache(model)
    with torch.no_grad():
        full = model(ids).logits
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(16)], 1)
    assert rel(steps, full) < 1e-5
    by_type = {}
    for kind, layer in zip(types, cache.layers):
        by_type.setdefault(kind, set()).add(id(layer.win_rope))
    assert all(len(ids_) == 1 for ids_ in by_type.values())
    assert len(set.union(*by_type.values())) == 2
    held = {id(t): t for layer in cache.layers for name in layer._tensors()
            if (t := getattr(layer, name)) is not None and t.is_floating_point()}
    assert sum(t.nbytes for t in held.values()) == summarize(model, contexts=(16,)).state_bytes[16]


def test_lolcats_keeps_no_second_copy_of_the_window(make_tiny_model):
    """LoLCATs reads the keys and values that leave the window from the window cache: beyond
    it, a layer holds one more position and, with the feature map before RoPE, the half
    cos/sin of each window position (not a copy of its keys and values)."""
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=1), method="lolcats", window=6,
                              linear_rope=False)
    cache = LinearizeCache(model)
    with torch.no_grad():
        model(torch.randint(1, 128, (1, 20)), cache=cache)
    layer = cache.layers[0]
    assert layer.win_k.shape[1] == layer.win_v.shape[1] == layer.win_rope.shape[1] == 6
    assert layer.win_rope.shape[-1] == layer.win_k.shape[-1]
    assert not any(name.startswith("tail") for name in vars(layer))



def test_info_names_the_plain_window_of_the_same_memory(make_tiny_model):
    """`linearize info`'s equal window: a window-sinks conversion at window W is its own equal
    (W exactly); a LoLCATs conversion's equal window holds no more than its decode state, and
    one token more would hold more."""
    from linearize.summary import summarize

    plain = summarize(linearize.convert(make_tiny_model("llama"), method="window-sinks", window=37), contexts=(64,))
    assert plain.equal_window(64) == 37 and "a plain window of 37 tokens + 4 sinks" in str(plain)
    model = linearize.convert(make_tiny_model("llama"), method="lolcats", window=8, linear_rope=False, sparse_cache=4)
    info = summarize(model, contexts=(64,))
    per_slot = info.kv_bytes_per_token
    held = (info.equal_window(64) - 1 + info.truncation_sinks) * per_slot
    assert held <= info.state_bytes[64] < held + per_slot
    assert summarize(make_tiny_model("llama"), contexts=(64,)).equal_window(64) is None


def test_info_breaks_the_constant_state_down(make_tiny_model):
    """`linearize info` says what holds the constant decode state, and the parts add up to it."""
    from linearize.summary import summarize

    model = linearize.convert(make_tiny_model("llama"), method="lolcats", window=8, linear_rope=False, sparse_cache=4)
    info = summarize(model, contexts=(64,))
    assert sum(info.constant_parts.values()) == info.state_bytes[64]
    assert all(b > 0 for b in info.constant_parts.values()) and len(info.constant_parts) == 4
    assert "constant part       window + sinks" in str(info) and "RoPE rotation (all layers)" in str(info)
    plain = summarize(linearize.convert(make_tiny_model("llama"), method="window-sinks", window=8), contexts=(64,))
    assert {k for k, b in plain.constant_parts.items() if b} == {"window + sinks"}
    assert "recurrent state" not in str(plain)


@pytest.mark.parametrize("sparse_cache", [0, 3])
def test_decode_without_position_ids_keeps_every_rows_rotation(make_tiny_model, sparse_cache):
    """With no position_ids the rotary embedding's cos/sin come with batch 1; a cache keeping
    the rotation (feature maps before RoPE) must hold it for every row of a batch of 2."""
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="lolcats", window=4,
                              linear_rope=False, num_sink_tokens=1, sparse_cache=sparse_cache, sparse_block=2)
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = LinearizeCache(model)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    assert rel(torch.cat(steps, dim=1), full) < 1e-5
    if not sparse_cache:
        assert cache.layers[0].win_rope.shape[0] == 2
