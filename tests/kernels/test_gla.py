"""chunk_gla (the chunked CPU path) against the fp64 loop reference naive_gla, and the dispatcher."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linearize.kernels import ENV_VAR, gated_linear_attention, select_backend
from linearize.kernels.gla.torch_chunk import chunk_gla
from linearize.kernels.gla.naive import naive_gla
from linearize.kernels.tolerances import tolerance
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64; NaN or inf never passes."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HKV, K, V, *, scalar=False, gate="mixed", N=None, dtype=torch.float32, seed=0):
    """Random q, k, v, g, initial_state (never zeros) in `dtype`; g by strength."""
    gen = torch.Generator().manual_seed(seed)
    shape_g = (B, T, HKV) if scalar else (B, T, HKV, K)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, HKV, K, generator=gen, dtype=F64) / K**0.5
    v = torch.randn(B, T, HKV, V, generator=gen, dtype=F64)
    if gate == "zero":
        g = torch.zeros(shape_g, dtype=F64)
    elif gate == "strong":
        g = -(5 + 15 * torch.rand(shape_g, generator=gen, dtype=F64))
    else:  # a mix of slow and fast channels, as in trained models
        g = torch.nn.functional.logsigmoid(2 * torch.randn(shape_g, generator=gen, dtype=F64) + 2)
    h0 = torch.randn(N or B, HKV, K, V, generator=gen, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, g)] + [h0.float() if dtype != F64 else h0]


def compare(inputs, *, scale=0.5, cu_seqlens=None, chunk_size=64, with_state=True):
    """Relative errors of chunk_gla vs naive_gla (fp64, on the same rounded inputs):
    {'o', 'state', 'dq', 'dk', 'dv', 'dg', 'dh0'}."""
    q, k, v, g, h0 = inputs
    h0 = h0 if with_state else None
    ref_in = [x.detach().to(F64).requires_grad_() for x in (q, k, v, g)]
    ref_h0 = None if h0 is None else h0.detach().to(F64).requires_grad_()
    o_ref, s_ref = naive_gla(*ref_in, scale=scale, initial_state=ref_h0, output_final_state=True, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=F64)
    ds = torch.randn(s_ref.shape, generator=gen, dtype=F64)
    leaves = ref_in + ([ref_h0] if ref_h0 is not None else [])
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)

    xs = [x.detach().requires_grad_() for x in (q, k, v, g)]
    hx = None if h0 is None else h0.detach().requires_grad_()
    o, s = chunk_gla(*xs, scale=scale, initial_state=hx, output_final_state=True, cu_seqlens=cu_seqlens,
                     chunk_size=chunk_size)
    assert o.dtype == q.dtype and o.shape == o_ref.shape
    assert s.dtype == (F64 if q.dtype == F64 else torch.float32) and s.shape == s_ref.shape
    grads = torch.autograd.grad((o * do.to(o.dtype)).sum() + (s * ds.to(s.dtype)).sum(), xs + ([hx] if hx is not None else []))
    names = ["dq", "dk", "dv", "dg", "dh0"]
    out = {"o": rel(o, o_ref), "state": rel(s, s_ref)}
    out.update({n: rel(a, b) for n, a, b in zip(names, grads, grads_ref)})
    return out


FP64, FP32, BF16 = (tolerance("gla", "torch", dt).forward for dt in ("float64", "float32", "bfloat16"))


def assert_below(errors: dict, tol: float):
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
@pytest.mark.parametrize("gate", ["mixed", "strong", "zero"])
def test_fp32_matches_reference(scalar, gate):
    # T not a multiple of the chunk, D not a power of two, grouped-query heads, B > 1
    errors = compare(make_inputs(2, 100, 4, 2, 48, 80, scalar=scalar, gate=gate))
    assert_below(errors, FP32)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_fp64_is_exact(scalar):
    errors = compare(make_inputs(1, 70, 3, 1, 20, 12, scalar=scalar, dtype=F64), chunk_size=32)
    assert_below(errors, FP64)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_bf16_inputs(scalar):
    errors = compare(make_inputs(1, 90, 4, 2, 32, 32, scalar=scalar, dtype=torch.bfloat16))
    assert_below(errors, BF16)


@pytest.mark.parametrize("chunk_size", [1, 8, 20, 24, 128])
def test_chunk_sizes(chunk_size):
    # 20 leaves sub-chunks of 4, 24 of 8; 128 > T is a single padded chunk
    assert_below(compare(make_inputs(1, 45, 2, 2, 16, 16), chunk_size=chunk_size), FP32)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_varlen_restarts_state(scalar):
    # a length-1 sequence, an empty one, one shorter and one longer than a chunk
    cu = torch.tensor([0, 1, 1, 30, 120])
    inputs = make_inputs(1, 120, 4, 2, 24, 40, scalar=scalar, N=4)
    assert_below(compare(inputs, cu_seqlens=cu, chunk_size=32), FP32)
    assert_below(compare(inputs, cu_seqlens=cu, chunk_size=32, with_state=False), FP32)


def test_varlen_equals_separate_calls():
    q, k, v, g, h0 = make_inputs(1, 50, 2, 1, 8, 8, N=3)
    cu = torch.tensor([0, 1, 17, 50])
    o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = chunk_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], initial_state=h0[n : n + 1],
                             output_final_state=True, chunk_size=16)
        assert rel(o[:, a:b], o_n) < 1e-6 and rel(s[n], s_n[0]) < 1e-6


def test_no_state_requested():
    q, k, v, g, _ = make_inputs(2, 10, 2, 1, 8, 8)
    o, s = chunk_gla(q, k, v, g)
    assert s is None and o.shape == (2, 10, 2, 8)


def test_strong_decay_forgets_and_never_overflows():
    q, k, v, g, h0 = make_inputs(1, 300, 2, 1, 16, 16, gate="strong")
    g = g * 10  # log decay down to -200 per token: exp(+sum) would overflow any float
    for gg in (g, g[..., 0]):
        x = [t.detach().requires_grad_() for t in (q, k, v, gg, h0)]
        o, s = chunk_gla(*x[:4], initial_state=x[4], output_final_state=True)
        (o.sum() + s.sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in x)
        # with decay this strong the output is the last token's own contribution
        own = torch.einsum("bthk,bthk->bth", q, k.expand_as(q)).unsqueeze(-1) * v.expand(-1, -1, 2, -1)
        assert rel(o, own) < 1e-5


def test_non_contiguous_inputs():
    # head-major projections viewed as [B, T, H, D], T a multiple of the chunk (no padding copy)
    q, k, v, g, h0 = make_inputs(2, 64, 4, 2, 8, 8)
    q, k, v, g = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g))
    assert not q.is_contiguous()
    assert_below(compare([q, k, v, g, h0], chunk_size=32), FP32)


def test_rejects_bad_shapes():
    q, k, v, g, h0 = make_inputs(1, 10, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        chunk_gla(q, k, v, g)
    q, k, v, g, h0 = make_inputs(2, 10, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 10]))


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 80),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    K=st.sampled_from([4, 12, 16]),
    V=st.sampled_from([4, 10]),
    scalar=st.booleans(),
    strength=st.sampled_from([0.0, 0.05, 1.0, 8.0, 30.0]),
    chunk_size=st.sampled_from([8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, T, group, K, V, scalar, strength, chunk_size, seed):
    H, HKV = group
    q, k, v, g, h0 = make_inputs(B, T, H, HKV, K, V, scalar=scalar, seed=seed)
    g = -torch.rand(g.shape, generator=torch.Generator().manual_seed(seed)) * strength
    errors = compare([q, k, v, g, h0], chunk_size=chunk_size)
    assert_below(errors, 5e-5)


# -- dispatcher ------------------------------------------------------------------------------
def test_dispatcher_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    q, k, v, g, h0 = make_inputs(1, 33, 2, 1, 8, 8)
    assert select_backend(q) == "torch"
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, s_ref = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_dispatcher_env_and_argument(monkeypatch, backend):
    q, k, v, g, h0 = make_inputs(1, 33, 2, 1, 8, 8)
    want = (naive_gla if backend == "naive" else chunk_gla)(q, k, v, g, scale=0.7)[0]
    monkeypatch.setenv(ENV_VAR, backend)
    assert select_backend(q) == backend
    assert torch.equal(gated_linear_attention(q, k, v, g, scale=0.7)[0], want)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert torch.equal(gated_linear_attention(q, k, v, g, scale=0.7, backend=backend)[0], want)


def test_dispatcher_bad_backend(monkeypatch):
    q, k, v, g, _ = make_inputs(1, 4, 1, 1, 4, 4)
    monkeypatch.setenv(ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='cuda-magic' is not a backend"):
        gated_linear_attention(q, k, v, g)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gated_linear_attention(q, k, v, g, backend="fast")


@pytest.fixture
def fallback_chunks(monkeypatch):
    """Counts the chunks (over all batch rows and KV heads) that chunk_gla hands to its exact
    fallback, one entry per call of the fallback."""
    import linearize.kernels.gla.torch_chunk as chunk_mod

    calls = []
    exact = chunk_mod._exact_terms

    def spy(qc, *args):
        calls.append(qc.shape[:3].numel())
        return exact(qc, *args)

    monkeypatch.setattr(chunk_mod, "_exact_terms", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_mixed_fast_and_fallback_chunks(fallback_chunks, scalar, dtype):
    """One sequence whose chunks take both paths, forward and gradients against the fp64
    reference: the factorised fast path (mild and zero decay) and the exact fallback (decay
    range >= 40, or a reference below -60), chosen per chunk, batch row and KV head."""
    C, T = 16, 16 * 7 + 5  # 8 chunks, the last one partial
    q, k, v, g, h0 = make_inputs(2, T, 4, 2, 12, 10, scalar=scalar, dtype=F64)
    g = g / 8  # mild decay everywhere (range ~1 per chunk): fast
    strong = torch.rand(g[:, 16:32, 0].shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    g[:, 16:32, 0] = -(5 + 15 * strong)  # chunk 1, KV head 0: range >= 75
    g[0, 48] = -90.0  # chunk 3, row 0: a very strong first token, small range but ref ~ -90
    g[1, 64:80, 1] = -3.0  # chunk 4, row 1, KV head 1: range 45
    g[:, 80:96] = 0.0  # chunk 5: zero decay, fast
    inputs = [x.to(dtype) for x in (q, k, v, g)] + [h0 if dtype == F64 else h0.float()]
    errors = compare(inputs, chunk_size=C)
    assert fallback_chunks == [2 + 2 + 1], fallback_chunks  # of 2 rows x 2 KV heads x 8 chunks = 32
    assert_below(errors, FP32 if dtype == torch.float32 else FP64)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
@pytest.mark.parametrize("gate", ["strong", "zero", "mixed"])
def test_path_selection(fallback_chunks, scalar, gate):
    """Strong decay (-5..-20 per token) takes the exact fallback in every full chunk, zero decay
    the factorised fast path in every chunk; the result matches the reference either way. (The
    last chunk holds 4 tokens: 3 strong gates may sum to less than the bound, so it may be fast.)"""
    errors = compare(make_inputs(2, 100, 4, 2, 48, 80, scalar=scalar, gate=gate), chunk_size=32)
    if gate == "strong":
        assert len(fallback_chunks) == 1 and fallback_chunks[0] >= 4 * 3, fallback_chunks  # 4 rows x 3 full chunks
    elif gate == "zero":
        assert fallback_chunks == []
    assert_below(errors, FP32)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_long_sequences_in_segments(monkeypatch, grad):
    """A sequence longer than the segment budget goes in segments that carry the state (with
    autograd, and without it, writing into one output): the same result and gradients as
    the reference, T not a multiple of the chunk or the segment, bf16 output dtype kept."""
    import linearize.kernels.gla.torch_chunk as chunk_module

    B, T, H, HKV, K, V = 2, 150, 4, 2, 12, 10
    monkeypatch.setattr(chunk_module, "_SEGMENT_ELEMENTS", B * 40 * H * K)  # 4 segments of 48 tokens
    calls = []
    one_piece = chunk_module._chunk_gla
    monkeypatch.setattr(chunk_module, "_chunk_gla", lambda q, *a, **kw: calls.append(q.shape[1]) or one_piece(q, *a, **kw))
    inputs = make_inputs(B, T, H, HKV, K, V)
    if grad:
        assert_below(compare(inputs, chunk_size=16), FP32)
    else:
        q, k, v, g, h0 = inputs
        o_ref, s_ref = naive_gla(*(x.to(F64) for x in (q, k, v, g)), scale=0.5, initial_state=h0.to(F64),
                                 output_final_state=True)
        with torch.no_grad():
            o, s = chunk_gla(q, k, v, g, scale=0.5, initial_state=h0, output_final_state=True, chunk_size=16)
            o16, _ = chunk_gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, scale=0.5, chunk_size=16)
        assert_below({"o": rel(o, o_ref), "state": rel(s, s_ref)}, FP32)
        assert o16.dtype == torch.bfloat16 and o16.shape == o.shape
    assert calls[:4] == [48, 48, 48, 6], calls


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
@pytest.mark.parametrize("T, gate", [(1, -29.8), (2, -29.8), (1, -75.0), (2, -75.0)],
                         ids=["1-fast", "2-fast", "1-fallback", "2-fallback"])
def test_gate_gradient_of_a_strongly_decaying_chunk(fallback_chunks, scalar, T, gate):
    """One or two tokens of very strong decay in a chunk padded to 8: the true gate gradient is
    ~exp(gate) (1e-13 and below) while the state-increment terms k_s exp(b_C - b_s) are of the
    size of k. Those terms reach g through their own exclusive cumulative sum, so the small
    gradient is not rounded away against them (it was: 3e-4 relative error, found by the
    property test). A reference below -60 takes the exact fallback, which does the same."""
    q, k, v, g, h0 = make_inputs(1, T, 2, 1, 4, 4, scalar=scalar, seed=290)
    g = torch.full_like(g, gate) - torch.rand(g.shape, generator=torch.Generator().manual_seed(1))
    errors = compare([q, k, v, g, h0], chunk_size=8)
    assert bool(fallback_chunks) == (gate * T < -60)
    assert_below(errors, FP32)


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_gate_gradient_across_sub_chunks(fallback_chunks, scalar):
    """Nine tokens of decay ~e^-75 each in a chunk of 16 (the fallback's sub-chunks of 8): the
    gate gradient (~e^-75, 1e-33 in all) comes from the terms between sub-chunks and from the
    initial state. Decays are flushed to zero only where they would be subnormal, so it stays
    accurate (zeroing the factors of the terms between sub-chunks below the square root of the
    smallest normal number, as speed would suggest, lost half of it)."""
    q, k, v, g, h0 = make_inputs(1, 9, 2, 1, 4, 4, scalar=scalar, seed=290)
    g = torch.full_like(g, -75.0) - torch.rand(g.shape, generator=torch.Generator().manual_seed(1))
    errors = compare([q, k, v, g, h0], chunk_size=16)
    assert fallback_chunks
    assert_below(errors, FP32)
