import pytest
import torch

import linearize.kernels.window.cached as cached_mod
from linearize.kernels import cached_window_attention, sliding_window_attention
from linearize.kernels.window.cached import cached_window_attention as torch_cached
from linearize.kernels.window.naive import naive_cached_window_attention

F64 = torch.float64


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def close(out, ref, tol):
    """Same -inf pattern (rows that see nothing), relative error under `tol` elsewhere."""
    for a, b in zip(out, ref):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert not torch.isnan(a).any()
        assert rel(a[finite], b[finite]) < tol


def past(B, S, L, HKV, D, seen, num_sink_tokens, dtype, gen):
    """A decode cache's past: sinks filled up to `seen`, a window of L positions with padding."""
    sink_k = torch.randn(B, S, HKV, D, dtype=dtype, generator=gen) if S else None
    sink_v = torch.randn(B, S, HKV, D, dtype=dtype, generator=gen) if S else None
    sink_mask = (torch.arange(S)[None, :] < seen[:, None].clamp(max=num_sink_tokens)) if S else None
    win_k = torch.randn(B, L, HKV, D, dtype=dtype, generator=gen) if L else None
    win_v = torch.randn(B, L, HKV, D, dtype=dtype, generator=gen) if L else None
    win_mask = (torch.rand(B, L, generator=gen) > 0.25) if L else None
    return dict(sink_k=sink_k, sink_v=sink_v, sink_mask=sink_mask, win_k=win_k, win_v=win_v, win_mask=win_mask,
                seen=seen)


CASES = [
    # T, window, num_sink_tokens, L, seen, left padding of the chunk, sink logits, softcap
    (1, 6, 2, 5, [9, 12], [0, 0], True, 5.0),  # the decode step
    (1, 6, 0, 5, [9, 12], [0, 0], False, None),
    (1, 6, 2, 5, [1, 12], [0, 0], False, 3.0),  # a new token that is a sink itself
    (7, 4, 1, 3, [6, 2], [0, 3], True, 4.0),
    (11, 5, 2, 4, [0, 1], [2, 5], False, 2.5),  # sinks arrive inside the chunk
    (40, 8, 2, 7, [20, 3], [0, 9], True, None),
    (9, 3, 0, 0, None, [4, 0], True, 6.0),  # nothing cached yet
]


@pytest.mark.parametrize("T, window, sinks, L, seen, pad, use_sl, cap", CASES)
@pytest.mark.parametrize("query_block", [256, 3])
def test_cached_window_matches_per_query_reference(T, window, sinks, L, seen, pad, use_sl, cap, query_block,
                                                   monkeypatch):
    monkeypatch.setattr(cached_mod, "QUERY_BLOCK", query_block)
    gen = torch.Generator().manual_seed(T * 100 + window * 10 + L)
    B, H, HKV, D = 2, 4, 2, 8
    seen_t = None if seen is None else torch.tensor(seen)
    cache = past(B, sinks, L, HKV, D, torch.zeros(B, dtype=torch.long) if seen_t is None else seen_t, sinks,
                 torch.float32, gen)
    cache["seen"] = seen_t
    q, k, v = (torch.randn(B, T, n, D, generator=gen) for n in (H, HKV, HKV))
    key_mask = None if not any(pad) else torch.arange(T)[None, :] >= torch.tensor(pad)[:, None]
    sink_logits = torch.randn(H, 2, generator=gen) if use_sl else None
    kw = dict(window=window, num_sink_tokens=sinks, scale=0.3, key_mask=key_mask, softcap=cap)
    to64 = {n: (t.to(F64) if t is not None and t.is_floating_point() else t) for n, t in cache.items()}
    ref = naive_cached_window_attention(q.to(F64), k.to(F64), v.to(F64), sink_logits=None if sink_logits is None
                                        else sink_logits.to(F64), **to64, **kw)
    out = torch_cached(q, k, v, sink_logits=sink_logits, **cache, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    close(out, ref, 1e-5)
    out64 = torch_cached(q.to(F64), k.to(F64), v.to(F64), sink_logits=None if sink_logits is None
                         else sink_logits.to(F64), **to64, **kw)
    close(out64, ref, 1e-5)
    via_dispatch = cached_window_attention(q, k, v, sink_logits=sink_logits, **cache, **kw)
    close(via_dispatch, out, 1e-7)


def test_reference_equals_window_op_on_a_split_sequence():
    """The definition agrees with the whole-sequence window op: a prefix kept as a cache (sinks
    plus the last window - 1 positions) and the rest as a chunk give the rows of the full pass."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, HKV, D, P, window, sinks = 2, 16, 4, 2, 8, 10, 4, 2
    q, k, v = (torch.randn(B, T, n, D, dtype=F64, generator=gen) for n in (H, HKV, HKV))
    key_mask = torch.arange(T)[None, :] >= torch.tensor([0, 3])[:, None]
    sl = torch.randn(H, dtype=F64, generator=gen)
    want, want_lse = sliding_window_attention(q, k, v, window=window, num_sink_tokens=sinks, sink_logits=sl,
                                              key_mask=key_mask, backend="naive", softcap=3.0)
    rank = key_mask.long().cumsum(-1) - 1
    is_sink = key_mask & (rank < sinks)
    sink_k, sink_v = torch.zeros(B, sinks, HKV, D, dtype=F64), torch.zeros(B, sinks, HKV, D, dtype=F64)
    for b in range(B):
        idx = is_sink[b, :P].nonzero().flatten()
        sink_k[b, :len(idx)], sink_v[b, :len(idx)] = k[b, idx], v[b, idx]
    lo = P - (window - 1)
    cache = dict(sink_k=sink_k, sink_v=sink_v, sink_mask=torch.ones(B, sinks, dtype=torch.bool),
                 win_k=k[:, lo:P], win_v=v[:, lo:P], win_mask=key_mask[:, lo:P] & ~is_sink[:, lo:P],
                 seen=key_mask[:, :P].sum(-1))
    o, lse, _ = naive_cached_window_attention(q[:, P:], k[:, P:], v[:, P:], window=window, num_sink_tokens=sinks,
                                              sink_logits=sl, key_mask=key_mask[:, P:], softcap=3.0, **cache)
    assert rel(o, want[:, P:]) < 1e-12
    assert rel(lse, want_lse[:, P:]) < 1e-12
