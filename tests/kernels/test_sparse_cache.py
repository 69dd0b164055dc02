"""LoLA's sparse cache on the past-window hybrid: the blocked implementation against the
reference written from the definition, and the cases where it must reduce to something known
(LoLCATs without a cache, softmax attention when nothing is evicted, any split into calls)."""
import pytest
import torch

from linearize.kernels.hybrid.naive import naive_past_window_attention, naive_sparse_past_window_attention
from linearize.kernels.hybrid.sparse_cache import sparse_past_window_attention


def key_map(Hs: int, D: int = 8, F: int = 6):
    """A fixed feature map per state head, [1, N, Hs, D] -> [1, N, Hs, F] (softmax of a projection)."""
    W = torch.randn(Hs, D, F, generator=torch.Generator().manual_seed(Hs), dtype=torch.float64)
    return lambda x: torch.softmax(torch.einsum("bnhd,hdf->bnhf", x, W.to(x.dtype)), -1)


def features(kl, Hs):
    """What the kernel's key map makes of the unmapped keys kl [B, T, HKV, D]: [B, T, Hs, F]."""
    return key_map(Hs, kl.shape[-1])(kl.repeat_interleave(Hs // kl.shape[2], dim=2))


def make(B=2, T=23, H=4, HKV=2, Hs=4, D=8, F=6, gate="scalar", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, kl = r(B, T, H, D), r(B, T, HKV, D), r(B, T, HKV, D), r(B, T, HKV, D)
    fq = torch.softmax(r(B, T, H, F), -1)
    g = None
    if gate == "scalar":
        g = torch.nn.functional.logsigmoid(r(B, T, HKV) + 2)
    elif gate == "vector":
        g = torch.nn.functional.logsigmoid(r(B, T, HKV, F) + 2)
    gamma = torch.sigmoid(r(H))
    return q, k, v, fq, kl, g, gamma


def run(q, k, v, fq, kl, g, gamma, state=None, key_mask=None, cu_seqlens=None, Hs=4, kmap=None, **kw):
    g0 = torch.zeros(*k.shape[:2], Hs, dtype=k.dtype) if g is None else g
    return sparse_past_window_attention(q, k, v, fq, kl, g0, key_map=kmap or key_map(Hs, k.shape[-1]), state_heads=Hs,
                                        scale=q.shape[-1] ** -0.5, window_factor=gamma, linear_factor=0.7,
                                        key_mask=key_mask, cu_seqlens=cu_seqlens, state=state, **kw)


def reference(q, k, v, fq, kl, g, gamma, key_mask=None, Hs=4, **kw):
    return naive_sparse_past_window_attention(q, k, v, fq, features(kl, Hs), g, scale=q.shape[-1] ** -0.5,
                                              window_factor=gamma, linear_factor=0.7, key_mask=key_mask, **kw)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


CASES = [
    dict(window=4, num_sink_tokens=2, budget=3, block=4),
    dict(window=3, num_sink_tokens=0, budget=2, block=1),
    dict(window=5, num_sink_tokens=1, budget=5, block=3),
    dict(window=2, num_sink_tokens=4, budget=1, block=6),
]


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
@pytest.mark.parametrize("Hs", [4, 2])
def test_matches_the_reference(spec, gate, Hs):
    x = make(Hs=Hs, gate=gate, seed=len(str(spec)) + Hs)
    key_mask = torch.ones(2, 23, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding
    o, _ = run(*x, key_mask=key_mask, Hs=Hs, **spec)
    ref = reference(*x, key_mask=key_mask, Hs=Hs, **spec)
    assert rel(o, ref) < 1e-10
    assert o[1, :5].abs().max() == 0


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.parametrize("gate", ["none", "vector"])
def test_pairs_shared_by_a_kv_group_match_the_reference(spec, gate):
    """cache_heads=HKV: each KV head's state heads pick one set of pairs together."""
    x = make(Hs=4, gate=gate, seed=len(str(spec)) + 7)
    key_mask = torch.ones(2, 23, dtype=torch.bool)
    key_mask[0, :4] = False
    o, state = run(*x, key_mask=key_mask, Hs=4, cache_heads=2, **spec)
    ref = reference(*x, key_mask=key_mask, Hs=4, cache_heads=2, **spec)
    assert rel(o, ref) < 1e-10
    assert state["sel_k"].shape[2] == 2 and state["sel_L"].shape[2] == 4
    alone = reference(*x, key_mask=key_mask, Hs=4, **spec)
    if spec["budget"] < 5:  # a shared choice differs from each head's own somewhere
        assert rel(ref, alone) > 1e-6


def test_without_a_cache_and_block_one_it_is_lolcats():
    """budget 0 and a selection every step put each key into the state as it leaves the
    window: LoLCATs' published past-window hybrid."""
    q, k, v, fq, kl, g, gamma = make(gate="scalar")
    o, _ = run(q, k, v, fq, kl, g, gamma, window=4, num_sink_tokens=2, budget=0, block=1)
    ref = naive_past_window_attention(q, k, v, fq, features(kl, 4), g, window=4, num_sink_tokens=2, scale=q.shape[-1] ** -0.5,
                                      window_factor=gamma, linear_factor=0.7)
    assert rel(o, ref) < 1e-10


def test_a_budget_as_long_as_the_sequence_is_softmax_attention():
    q, k, v, fq, kl, g, gamma = make(gate="vector")
    o, _ = run(q, k, v, fq, kl, g, gamma, window=3, num_sink_tokens=1, budget=23, block=2)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * q.shape[-1] ** -0.5
    s = s.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vv)
    assert rel(o, ref) < 1e-12


@pytest.mark.parametrize("splits", [[23], [1] * 23, [5, 1, 1, 9, 7], [8, 15]])
@pytest.mark.parametrize("Hs, cache_heads", [(2, None), (4, 2)])
def test_any_split_into_calls_gives_one_forward(splits, Hs, cache_heads):
    x = make(gate="scalar", Hs=Hs)
    spec = dict(window=4, num_sink_tokens=2, budget=3, block=4, cache_heads=cache_heads)
    key_mask = torch.ones(2, 23, dtype=torch.bool)
    key_mask[0, :3] = False
    full, _ = run(*x, key_mask=key_mask, Hs=Hs, **spec)
    state, parts, t0 = None, [], 0
    for n in splits:
        part = [t[:, t0:t0 + n] if t is not None and t.dim() > 1 else t for t in x]
        o, state = run(*part, state=state, key_mask=key_mask[:, t0:t0 + n], Hs=Hs, **spec)
        parts.append(o)
        t0 += n
    assert rel(torch.cat(parts, dim=1), full) < 1e-12


def test_packed_sequences_are_independent_rows():
    q, k, v, fq, kl, g, gamma = make(B=1, T=30, gate="scalar")
    spec = dict(window=3, num_sink_tokens=1, budget=2, block=4)
    cu = torch.tensor([0, 11, 30])
    o, _ = run(q, k, v, fq, kl, g, gamma, cu_seqlens=cu, **spec)
    for s, e in ((0, 11), (11, 30)):
        alone, _ = run(*[t[:, s:e] if t.dim() > 1 else t for t in (q, k, v, fq, kl, g, gamma)], **spec)
        assert rel(o[:, s:e], alone) < 1e-12


def test_the_cache_keeps_the_pairs_the_state_reproduces_worst():
    """One value far from the rest (a passkey among filler) must stay exact."""
    q, k, v, fq, kl, g, gamma = make(B=1, T=40, H=1, HKV=1, Hs=1, gate="none")
    v = v * 0.01
    v[0, 10] = 50.0
    flat = lambda x: torch.full((*x.shape[:3], fq.shape[-1]), 1.0 / fq.shape[-1], dtype=x.dtype)  # noqa: E731
    _, state = run(q, k, v, fq, kl, g, gamma, window=4, num_sink_tokens=0, budget=1, block=4, Hs=1, kmap=flat)
    assert state["sel_valid"][0, 0, 0] and int(state["sel_rank"][0, 0, 0]) == 10


@pytest.mark.parametrize("splits", [[23], [1] * 23, [5, 1, 1, 9, 7]])
def test_a_state_keeping_the_rotation_instead_of_the_roped_keys_gives_the_same_bits(splits):
    """k_rope: k is kl rotated (Llama convention, scaled as YaRN scales it); the state keeps
    each recent token's half cos/sin instead of its RoPE'd keys and redoes the rotation with the
    same operations, so every split gives exactly what the state keeping k gives."""
    q, _, v, fq, kl, g, gamma = make(gate="scalar", Hs=2)
    gen = torch.Generator().manual_seed(5)
    angles = torch.rand(2, 23, 4, generator=gen, dtype=torch.float64) * 30
    c, s = angles.cos() * 1.2, angles.sin() * 1.2
    cos, sin = torch.cat([c, c], dim=-1)[:, :, None], torch.cat([s, s], dim=-1)[:, :, None]
    k1, k2 = kl.chunk(2, dim=-1)
    k = kl * cos + torch.cat([-k2, k1], dim=-1) * sin
    halves = torch.cat([c, s], dim=-1)
    spec = dict(window=4, num_sink_tokens=2, budget=3, block=4)
    key_mask = torch.ones(2, 23, dtype=torch.bool)
    key_mask[0, :3] = False
    ref = reference(q, k, v, fq, kl, g, gamma, key_mask=key_mask, Hs=2, **spec)
    whole, _ = run(q, k, v, fq, kl, g, gamma, key_mask=key_mask, Hs=2, **spec)
    state, parts, t0 = None, [], 0
    for n in splits:
        part = [t[:, t0:t0 + n] for t in (q, k, v, fq, kl, g, halves)]
        o, state = run(*part[:6], gamma, state=state, key_mask=key_mask[:, t0:t0 + n], Hs=2, k_rope=part[6], **spec)
        parts.append(o)
        t0 += n
    assert torch.equal(torch.cat(parts, dim=1), whole) if splits == [23] else rel(torch.cat(parts, dim=1), whole) < 1e-12
    assert rel(whole, ref) < 1e-10
    assert "recent_k" not in state and state["recent_rope"].shape[-1] == 8
