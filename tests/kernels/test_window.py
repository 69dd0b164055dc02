"""chunk_window_attention (blocked CPU path) against the dense fp64 reference, and the dispatcher."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linearize.kernels import ENV_VAR, select_backend, sliding_window_attention
from linearize.kernels.window.torch_chunk import chunk_window_attention
from linearize.kernels.tolerances import tolerance
from linearize.kernels.window.naive import naive_window_attention
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over finite entries; -inf must match exactly and NaN never passes."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert not torch.isnan(a).any(), "NaN"
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a)), "non-finite entries differ"
    assert torch.equal(a[~fin], b[~fin])
    a, b = a[fin], b[fin]
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HKV, D, Dv, *, sinks_shape=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    k = torch.randn(B, T, HKV, D, generator=gen, dtype=F64)
    v = torch.randn(B, T, HKV, Dv, generator=gen, dtype=F64)
    sl = None if sinks_shape is None else torch.randn(sinks_shape, generator=gen, dtype=F64)
    return [x if x is None else x.to(dtype) for x in (q, k, v, sl)]


def compare(inputs, *, block_size=16, **kw):
    """Relative errors {'o', 'lse', 'dq', 'dk', 'dv', 'dsink'} of chunk vs naive (fp64 on the same
    rounded inputs), with a loss that reads both o and lse."""
    q, k, v, sl = inputs
    ref = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    ref_sl = None if sl is None else sl.detach().to(F64).requires_grad_()
    o_ref, lse_ref = naive_window_attention(*ref, sink_logits=ref_sl, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=F64)
    dl = torch.randn(lse_ref.shape, generator=gen, dtype=F64)

    def loss(o, lse):
        return (o * do.to(o.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dl.to(lse.dtype)).sum()

    leaves_ref = ref + ([ref_sl] if ref_sl is not None else [])
    g_ref = torch.autograd.grad(loss(o_ref, lse_ref), leaves_ref)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    xsl = None if sl is None else sl.detach().requires_grad_()
    o, lse = chunk_window_attention(*xs, sink_logits=xsl, block_size=block_size, **kw)
    assert o.dtype == q.dtype and o.shape == o_ref.shape
    assert lse.dtype == (F64 if q.dtype == F64 else torch.float32) and lse.shape == lse_ref.shape
    grads = torch.autograd.grad(loss(o, lse), xs + ([xsl] if xsl is not None else []))
    out = {"o": rel(o, o_ref), "lse": rel(lse, lse_ref)}
    out.update({n: rel(a, b) for n, a, b in zip(["dq", "dk", "dv", "dsink"], grads, g_ref)})
    return out


FP32 = tolerance("window", "torch", "float32").forward


def assert_below(errors: dict, tol: float):
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def padding_mask(B, T, seed=0):
    """Left padding on row 0, random holes elsewhere, never a fully padded batch."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[0, : T // 3] = False
    return mask


@pytest.mark.parametrize(
    "window, sinks, sinks_shape",
    [(16, 0, None), (20, 3, None), (20, 2, (4,)), (7, 1, (4, 3)), (None, 0, (4,)), (1, 0, None), (500, 2, None)],
)
def test_fp32_matches_reference(window, sinks, sinks_shape):
    # T not a multiple of the block, D and Dv not powers of two, H != HKV
    inputs = make_inputs(2, 100, 4, 2, 48, 80, sinks_shape=sinks_shape)
    assert_below(compare(inputs, window=window, num_sink_tokens=sinks), FP32)


@pytest.mark.parametrize("window, sinks, sinks_shape", [(20, 3, (6, 2)), (None, 0, None), (5, 0, None)])
def test_padding_mask(window, sinks, sinks_shape):
    inputs = make_inputs(2, 90, 6, 3, 16, 24, sinks_shape=sinks_shape)
    assert_below(compare(inputs, window=window, num_sink_tokens=sinks, key_mask=padding_mask(2, 90)), FP32)


@pytest.mark.parametrize("window, sinks, sinks_shape", [(10, 2, (4,)), (None, 0, None), (3, 4, None)])
def test_varlen(window, sinks, sinks_shape):
    cu = torch.tensor([0, 1, 1, 40, 47, 150])  # a length-1 and an empty sequence
    inputs = make_inputs(1, 150, 4, 1, 16, 8, sinks_shape=sinks_shape)
    assert_below(compare(inputs, window=window, num_sink_tokens=sinks, cu_seqlens=cu), FP32)


def test_fp64_is_exact():
    inputs = make_inputs(1, 70, 2, 1, 12, 12, sinks_shape=(2, 2), dtype=F64)
    assert_below(compare(inputs, window=9, num_sink_tokens=2, scale=0.3), 1e-12)


@pytest.mark.parametrize("window", [12, None])
def test_bf16_inputs(window):
    inputs = make_inputs(1, 80, 4, 2, 32, 32, sinks_shape=(4,), dtype=torch.bfloat16)
    assert_below(compare(inputs, window=window, num_sink_tokens=2), 1e-2)


@pytest.mark.parametrize("block_size", [1, 5, 64, 256])
def test_block_sizes(block_size):
    inputs = make_inputs(1, 60, 2, 2, 8, 8, sinks_shape=(2,))
    assert_below(compare(inputs, window=13, num_sink_tokens=2, block_size=block_size), FP32)


def test_empty_rows_are_zero_with_nan_free_gradients():
    q, k, v, _ = make_inputs(2, 40, 2, 1, 8, 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :10] = False  # queries 0..9 of row 0 see nothing
    mask[1] = False  # row 1 is all padding
    for sl in (None, torch.randn(2)):
        x = [t.detach().requires_grad_() for t in (q, k, v)] + ([sl.requires_grad_()] if sl is not None else [])
        o, lse = chunk_window_attention(*x[:3], window=4, sink_logits=x[3] if sl is not None else None, key_mask=mask)
        assert (o[0, :10] == 0).all() and (o[1] == 0).all()
        if sl is None:
            assert torch.isneginf(lse[0, :10]).all() and torch.isneginf(lse[1]).all()
        else:
            assert torch.allclose(lse[1], sl.expand(40, 2).to(lse.dtype))
        (o.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in x)
        assert (x[0].grad[1] == 0).all()


def test_small_window_cost_is_banded():
    # the band holds window + block keys per query block, never the whole sequence
    import linearize.kernels.window.torch_chunk as wc

    seen = []
    orig = wc._group_scores

    def spy(plan, i0, i1, nbg, *args):
        out = orig(plan, i0, i1, nbg, *args)
        seen.append(out[0].shape[-1])
        return out

    q, k, v, _ = make_inputs(1, 1000, 1, 1, 8, 8)
    q.requires_grad_()  # lse under autograd: the general blocked path
    wc._group_scores = spy
    try:
        chunk_window_attention(q, k, v, window=30, num_sink_tokens=2, block_size=32)
    finally:
        wc._group_scores = orig
    assert max(seen) == 64

    # the fused path's key blocks are banded too: sinks + P + block keys
    calls = []
    orig_sdpa = wc._sdpa

    def spy_sdpa(q_, k_, *args):
        calls.append(k_.shape[-2])
        return orig_sdpa(q_, k_, *args)

    wc._sdpa = spy_sdpa
    try:
        with torch.no_grad():
            chunk_window_attention(q, k, v, window=30, num_sink_tokens=2, need_lse=False)
    finally:
        wc._sdpa = orig_sdpa
    assert calls == [72, 2 + 32 + 32]  # the dense head (E = 1000 - 29 * 32 = 72 >= 30 + 32 + 2), then each block


def test_non_contiguous_inputs():
    q, k, v, sl = make_inputs(2, 64, 4, 2, 8, 8, sinks_shape=(4,))
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    assert_below(compare([q, k, v, sl], window=10, num_sink_tokens=2, block_size=32), FP32)


def test_rejects_bad_arguments():
    q, k, v, _ = make_inputs(2, 10, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="window"):
        chunk_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="sink_logits"):
        chunk_window_attention(q, k, v, window=4, sink_logits=torch.zeros(3))
    with pytest.raises(ValueError, match="either cu_seqlens"):
        chunk_window_attention(q[:1], k[:1], v[:1], window=4, key_mask=torch.ones(1, 10, dtype=torch.bool),
                               cu_seqlens=torch.tensor([0, 10]))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 70),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    D=st.sampled_from([4, 12]),
    window=st.one_of(st.none(), st.integers(1, 80)),
    sinks=st.integers(0, 3),
    sink_logits=st.sampled_from([None, 1, 2]),
    masked=st.booleans(),
    block_size=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, T, group, D, window, sinks, sink_logits, masked, block_size, seed):
    H, HKV = group
    inputs = make_inputs(B, T, H, HKV, D, D, sinks_shape=None if sink_logits is None else (H, sink_logits), seed=seed)
    mask = padding_mask(B, T, seed) if masked else None
    if mask is not None and not mask.any():
        mask[0, -1] = True
    errors = compare(inputs, window=window, num_sink_tokens=sinks, key_mask=mask, block_size=block_size)
    # a single sink logit's gradient is one fp32 sum of signed terms: allow for its conditioning
    assert_below(errors, 5e-5)


# -- dispatcher ------------------------------------------------------------------------------
def test_dispatcher_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    q, k, v, sl = make_inputs(1, 33, 2, 1, 8, 8, sinks_shape=(2,))
    assert select_backend(q) == "torch"
    got = sliding_window_attention(q, k, v, window=5, num_sink_tokens=1, sink_logits=sl)
    want = chunk_window_attention(q, k, v, window=5, num_sink_tokens=1, sink_logits=sl)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_dispatcher_env_and_argument(monkeypatch, backend):
    q, k, v, _ = make_inputs(1, 33, 2, 1, 8, 8)
    fn = naive_window_attention if backend == "naive" else chunk_window_attention
    want = fn(q, k, v, window=6, num_sink_tokens=2)
    monkeypatch.setenv(ENV_VAR, backend)
    assert select_backend(q) == backend
    assert all(torch.equal(a, b) for a, b in zip(sliding_window_attention(q, k, v, window=6, num_sink_tokens=2), want))
    monkeypatch.setenv(ENV_VAR, "auto")
    got = sliding_window_attention(q, k, v, window=6, num_sink_tokens=2, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_dispatcher_bad_backend(monkeypatch):
    q, k, v, _ = make_inputs(1, 4, 1, 1, 4, 4)
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='gpu' is not a backend"):
        sliding_window_attention(q, k, v, window=2)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        sliding_window_attention(q, k, v, window=2, backend="fast")


# -- the fused band path (PyTorch SDPA over the band; no padding, no packing) -------------------

@pytest.mark.parametrize("T, window, sinks, sinks_shape, B, H, HKV", [
    (200, 64, 0, None, 1, 6, 2),      # Liger's window, GQA
    (131, 20, 4, None, 2, 4, 4),      # window + sink tokens, T not a multiple of the block
    (300, 33, 3, (6, 4), 1, 6, 3),    # sink tokens and sink logits [H, M]
    (97, 96, 0, (4,), 1, 4, 2),       # window one below T: the dense head covers everything
    (500, 5, 2, None, 1, 2, 1),       # tiny window, many band blocks
])
def test_fused_band_matches_reference(T, window, sinks, sinks_shape, B, H, HKV):
    from linearize.kernels.window.torch_chunk import sdpa_band_attention

    q, k, v, sl = make_inputs(B, T, H, HKV, 16, 12, sinks_shape=sinks_shape)
    o_ref, lse_ref = naive_window_attention(q.to(F64), k.to(F64), v.to(F64), window=window, num_sink_tokens=sinks,
                                            sink_logits=None if sl is None else sl.to(F64))
    for need_lse in (False, True):
        o, lse = sdpa_band_attention(q, k, v, window=window, num_sink_tokens=sinks, sink_logits=sl, need_lse=need_lse)
        assert o.dtype == q.dtype and o.shape == o_ref.shape
        assert rel(o, o_ref) < 2e-6
        if need_lse:
            assert rel(lse, lse_ref) < 2e-6
        else:
            assert lse is None
    # the public op takes this path whenever it applies, and agrees with the general blocked path
    with torch.no_grad():
        o_fast, _ = chunk_window_attention(q, k, v, window=window, num_sink_tokens=sinks, sink_logits=sl,
                                           need_lse=False)
    assert rel(o_fast, o_ref) < 2e-6


@pytest.mark.parametrize("sinks, sinks_shape", [(0, None), (4, None), (2, (4, 3))])
def test_fused_band_gradients(sinks, sinks_shape):
    """Training through the fused path (lse unused): dq, dk, dv match the fp64 reference; sink
    logits that require grad take the general path, so their gradient stays exact too."""
    q, k, v, sl = make_inputs(2, 150, 4, 2, 16, 16, sinks_shape=sinks_shape)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(2, 150, 4, 16, generator=gen, dtype=F64)
    ref = [x.to(F64).requires_grad_() for x in (q, k, v)]
    ref_sl = None if sl is None else sl.to(F64).requires_grad_()
    o_ref, _ = naive_window_attention(*ref, window=40, num_sink_tokens=sinks, sink_logits=ref_sl)
    g_ref = torch.autograd.grad((o_ref * do).sum(), ref + ([ref_sl] if sl is not None else []))
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    xsl = None if sl is None else sl.detach().requires_grad_()
    o, lse = sliding_window_attention(*xs, window=40, num_sink_tokens=sinks, sink_logits=xsl, need_lse=False,
                                      backend="torch")
    grads = torch.autograd.grad((o * do.float()).sum(), xs + ([xsl] if sl is not None else []))
    for a, b in zip(grads, g_ref):
        assert rel(a, b) < 5e-6


def test_fused_band_only_where_it_applies():
    """Padding, many short packed sequences, and lse under autograd keep the general path (lse
    comes back); packed sequences a window long on average take the fused one."""
    q, k, v, _ = make_inputs(1, 120, 2, 1, 8, 8)
    assert chunk_window_attention(q, k, v, window=16, need_lse=False)[1] is None
    mask = torch.ones(1, 120, dtype=torch.bool)
    mask[0, :7] = False
    assert chunk_window_attention(q, k, v, window=16, need_lse=False, key_mask=mask)[1] is not None
    cu = torch.tensor([0, 50, 120])
    assert chunk_window_attention(q, k, v, window=16, need_lse=False, cu_seqlens=cu)[1] is None
    many = torch.arange(0, 121, 10)  # 12 sequences of 10 tokens: 120 < 12 * 16
    assert chunk_window_attention(q, k, v, window=16, need_lse=False, cu_seqlens=many)[1] is not None
    qg = q.clone().requires_grad_()
    o, lse = chunk_window_attention(qg, k, v, window=16)
    assert lse is not None and lse.requires_grad


@pytest.mark.parametrize("sinks, sinks_shape", [(0, None), (3, None), (2, (4, 2))])
def test_fused_band_packed_sequences(sinks, sinks_shape):
    """Packed sequences through the fused path, one at a time (a length-1 sequence, one shorter
    than the window, two longer): outputs, lse without autograd, and dq, dk, dv against the
    fp64 reference; attention never crosses a sequence start."""
    T, window = 160, 24
    cu = torch.tensor([0, 1, 17, 90, T])
    q, k, v, sl = make_inputs(1, T, 4, 2, 16, 16, sinks_shape=sinks_shape)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(1, T, 4, 16, generator=gen, dtype=F64)
    ref = [x.to(F64).requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = naive_window_attention(*ref, window=window, num_sink_tokens=sinks, cu_seqlens=cu,
                                            sink_logits=None if sl is None else sl.to(F64))
    g_ref = torch.autograd.grad((o_ref * do).sum(), ref)
    with torch.no_grad():
        o, lse = chunk_window_attention(q, k, v, window=window, num_sink_tokens=sinks, sink_logits=sl,
                                        cu_seqlens=cu, need_lse=True)
    assert rel(o, o_ref) < 2e-6 and rel(lse, lse_ref) < 2e-6
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o, lse = chunk_window_attention(*xs, window=window, num_sink_tokens=sinks, sink_logits=sl, cu_seqlens=cu,
                                    need_lse=False)
    assert lse is None  # the fused path ran
    assert rel(o, o_ref) < 2e-6
    for a, b in zip(torch.autograd.grad((o * do.float()).sum(), xs), g_ref):
        assert rel(a, b) < 5e-6
