"""Gemma-2's attention logit soft-cap (s -> c * tanh(s / c) on the scaled scores) in every window
softmax: the blocked PyTorch ops against the fp64 naive references (outputs, lse, gradients),
against softmax attention written out densely when the window covers the sequence, and
softcap=None leaving every op bit for bit as it was."""
import pytest
import torch

from linearize.kernels import (hybrid_attention, past_window_attention, sliding_window_attention,
                               window_max_score)
from linearize.kernels.hybrid.naive import naive_past_window_attention, naive_sparse_past_window_attention
from linearize.kernels.hybrid.sparse_cache import sparse_past_window_attention
from linearize.kernels.window.torch_chunk import chunk_window_attention
from linearize.kernels.window.naive import naive_window_attention, naive_window_max_score
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

F64 = torch.float64
CAP = 1.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over finite entries of b; a must be finite exactly there, never NaN."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert not torch.isnan(a).any(), "NaN"
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a)), "non-finite entries differ"
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


def qkv(B=2, T=37, H=4, HKV=2, D=12, Dv=10, seed=0, spread=3.0):
    """Scores of several units (spread), so that a cap of 1.5 changes the softmax a lot."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return r(B, T, H, D) * spread, r(B, T, HKV, D) * spread, r(B, T, HKV, Dv)


def padding(B, T, pads=(0, 5)):
    mask = torch.ones(B, T, dtype=torch.bool)
    for row, p in enumerate(pads[:B]):
        mask[row, :p] = False
    return mask


CASES = [
    dict(window=8, num_sink_tokens=2, sinks=True, padded=True),
    dict(window=8, num_sink_tokens=3, sinks=False, padded=False),
    dict(window=5, num_sink_tokens=0, sinks=True, padded=False),
    dict(window=None, num_sink_tokens=0, sinks=False, padded=True),
]


def case_kwargs(case, B, T, H):
    gen = torch.Generator().manual_seed(1)
    return dict(window=case["window"], num_sink_tokens=case["num_sink_tokens"],
                sink_logits=torch.randn(H, 2, generator=gen) if case["sinks"] else None,
                key_mask=padding(B, T) if case["padded"] else None)


@pytest.mark.parametrize("case", CASES)
def test_blocked_window_matches_the_fp64_reference_with_gradients(case):
    q, k, v = qkv()
    kw = case_kwargs(case, q.shape[0], q.shape[1], q.shape[2])
    sl = kw.pop("sink_logits")
    ref_in = [x.double().requires_grad_() for x in (q, k, v)] + ([sl.double().requires_grad_()] if sl is not None else [])
    out_in = [x.clone().requires_grad_() for x in (q, k, v)] + ([sl.clone().requires_grad_()] if sl is not None else [])
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(*q.shape[:3], v.shape[-1], generator=gen)
    dl = torch.randn(*q.shape[:3], generator=gen)

    def loss(o, lse):
        return (o * do.to(o.dtype)).sum() + (lse.nan_to_num(0.0, 0.0, 0.0) * dl.to(lse.dtype)).sum()

    o_ref, lse_ref = naive_window_attention(*ref_in[:3], sink_logits=ref_in[3] if sl is not None else None,
                                            softcap=CAP, **kw)
    loss(o_ref, lse_ref).backward()
    o, lse = chunk_window_attention(*out_in[:3], sink_logits=out_in[3] if sl is not None else None, softcap=CAP,
                                    block_size=16, **kw)
    loss(o, lse).backward()
    assert rel(o, o_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    for a, b in zip(out_in, ref_in):
        assert rel(a.grad, b.grad) < 1e-5
    uncapped, _ = naive_window_attention(*[x.double() for x in (q, k, v)],
                                         sink_logits=None if sl is None else sl.double(), **kw)
    assert rel(o, uncapped) > 0.1  # the cap matters at these scores


def test_packed_sequences_with_a_cap():
    q, k, v = qkv(B=1, T=30)
    cu = torch.tensor([0, 1, 13, 30])
    kw = dict(window=6, num_sink_tokens=2, cu_seqlens=cu, softcap=CAP)
    o_ref, lse_ref = naive_window_attention(q.double(), k.double(), v.double(), **kw)
    o, lse = chunk_window_attention(q, k, v, block_size=8, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5
    m_ref = naive_window_max_score(q.double(), k.double(), **{a: b for a, b in kw.items()})
    assert rel(window_max_score(q, k, backend="torch", **kw), m_ref) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_row_max_of_capped_scores(case):
    q, k, _ = qkv()
    kw = case_kwargs(case, q.shape[0], q.shape[1], q.shape[2])
    kw.pop("sink_logits")
    qd = q.double().requires_grad_()
    qf = q.clone().requires_grad_()
    m_ref = naive_window_max_score(qd, k.double(), softcap=CAP, **kw)
    m = window_max_score(qf, k, softcap=CAP, backend="torch", **kw)
    assert rel(m, m_ref) < 1e-6
    assert (m[torch.isfinite(m)].abs() <= CAP).all()
    m_ref.nan_to_num(0.0, 0.0, 0.0).sum().backward()
    m.nan_to_num(0.0, 0.0, 0.0).sum().backward()
    assert rel(qf.grad, qd.grad) < 1e-5


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_window_covering_the_sequence_is_exact_capped_softmax_attention(backend):
    q, k, v = qkv(B=2, T=21, H=4, HKV=2, D=8, Dv=8)
    scale = 0.3
    o, _ = sliding_window_attention(q, k, v, window=21, scale=scale, softcap=CAP, backend=backend)
    kr, vr = (x.double().repeat_interleave(2, dim=2) for x in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q.double(), kr) * scale
    s = CAP * torch.tanh(s / CAP)
    causal = torch.ones(21, 21, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    ref = torch.einsum("bhts,bshd->bthd", p, vr)
    assert rel(o, ref) < 1e-5


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_no_cap_is_bit_for_bit_unchanged(backend):
    q, k, v = qkv()
    kw = dict(window=8, num_sink_tokens=2, key_mask=padding(2, 37), backend=backend)
    for a, b in zip(sliding_window_attention(q, k, v, **kw), sliding_window_attention(q, k, v, softcap=None, **kw)):
        assert torch.equal(a, b)
    # the fused band path (no padding, no lse) is kept when uncapped
    kw = dict(window=8, num_sink_tokens=2, need_lse=False, backend=backend)
    assert torch.equal(sliding_window_attention(q, k, v, **kw)[0], sliding_window_attention(q, k, v, softcap=None, **kw)[0])
    assert torch.equal(window_max_score(q, k, window=8, backend=backend),
                       window_max_score(q, k, window=8, softcap=None, backend=backend))


def hybrid_inputs(B=2, T=29, H=4, HKV=2, D=8, F=6, seed=0, gate=True):
    q, k, v = qkv(B=B, T=T, H=H, HKV=HKV, D=D, Dv=D, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    q_lin = torch.softmax(torch.randn(B, T, H, F, generator=gen), -1)
    k_lin = torch.softmax(torch.randn(B, T, HKV, F, generator=gen), -1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HKV, generator=gen) + 2) if gate else None
    return q, k, v, q_lin, k_lin, g


@pytest.mark.parametrize("mode", ["mix", "shared"])
def test_hybrid_window_branch_is_capped(mode):
    q, k, v, ql, kl, g = hybrid_inputs()
    gen = torch.Generator().manual_seed(3)
    kw = dict(window=6, mode=mode, num_sink_tokens=2, sink_logits=torch.randn(4, 2, generator=gen),
              key_mask=padding(2, 29), softcap=CAP)
    if mode == "shared":
        kw["c"] = torch.rand(4, generator=gen)
    ref, _ = hybrid_attention(*[x.double() for x in (q, k, v, ql, kl, g)], backend="naive",
                              **{a: (b.double() if isinstance(b, torch.Tensor) and b.is_floating_point() else b)
                                 for a, b in kw.items()})
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = hybrid_attention(*xs, ql, kl, g, backend="torch", **kw)
    assert rel(o, ref) < 1e-5
    uncapped, _ = hybrid_attention(q, k, v, ql, kl, g, backend="torch", **{**kw, "softcap": None})
    assert rel(uncapped, ref) > 1e-2
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_past_window_hybrid_is_capped_in_its_window_and_row_max():
    q, k, v, ql, kl, g = hybrid_inputs()
    gen = torch.Generator().manual_seed(4)
    gam, lam = torch.rand(4, generator=gen) * 0.9 + 0.05, torch.rand(4, generator=gen) * 2
    kw = dict(window=5, num_sink_tokens=2, key_mask=padding(2, 29), softcap=CAP)
    ref = naive_past_window_attention(*[x.double() for x in (q, k, v, ql, kl, g)], window_factor=gam.double(),
                                      linear_factor=lam.double(), **kw)
    xs = [x.clone().requires_grad_() for x in (q, k)]
    o = past_window_attention(*xs, v, ql, kl, g, window_factor=gam, linear_factor=lam, backend="torch", **kw)
    assert rel(o, ref) < 1e-5
    uncapped = past_window_attention(q, k, v, ql, kl, g, window_factor=gam, linear_factor=lam, backend="torch",
                                     **{**kw, "softcap": None})
    assert rel(uncapped, ref) > 1e-2
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_sparse_cache_exact_scores_are_capped():
    q, k, v, ql, kl, g = (x.double() for x in hybrid_inputs(T=23))
    gam = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=F64)
    kw = dict(window=4, num_sink_tokens=2, budget=3, block=4, scale=q.shape[-1] ** -0.5, window_factor=gam,
              linear_factor=0.7, softcap=CAP)
    ref = naive_sparse_past_window_attention(q, k, v, ql, kl, g, **kw)
    as_features = dict(key_map=lambda x: x, state_heads=kl.shape[2])  # kl already holds the keys' features
    o, _ = sparse_past_window_attention(q, k, v, ql, kl, g, **as_features, **kw)
    assert rel(o, ref) < 1e-10
    uncapped, _ = sparse_past_window_attention(q, k, v, ql, kl, g, **as_features, **{**kw, "softcap": None})
    assert rel(uncapped, ref) > 1e-2


def test_a_cap_must_be_positive():
    q, k, v = qkv(T=5)
    with pytest.raises(ValueError, match="softcap"):
        chunk_window_attention(q, k, v, window=3, softcap=0.0)
