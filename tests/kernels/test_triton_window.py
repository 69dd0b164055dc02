"""Triton sliding-window attention (forward, backward, lse gradients) against the fp64 reference.

Runs in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before any kernel module
is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
BLOCK_M is 16 when interpreting, so T=40 spans three query/key blocks, the last partial.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from linearize.kernels import sliding_window_attention  # noqa: E402
from linearize.kernels.window.naive import naive_window_attention  # noqa: E402
from linearize.kernels.window.triton_chunk import BLOCK_M, triton_window_attention  # noqa: E402
from linearize.kernels.tolerances import tolerance  # noqa: E402

TOL = {dt: tolerance("window", "triton", dt).forward for dt in (torch.float32, torch.bfloat16)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries of ref; out must be finite exactly where
    ref is (an empty row's lse is -inf in both), so NaN never passes."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    assert not torch.isnan(out).any(), "NaN in the kernel output"
    assert torch.equal(torch.isfinite(out), finite), "non-finite entries differ from the reference"
    assert torch.equal(out[~finite], ref[~finite])
    if not finite.any():
        return 0.0
    return ((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-300)).item()


def check_window(B=2, T=40, H=4, HKV=2, D=48, DV=20, *, window=7, sinks=0, sink_logits=None, key_mask=None,
                 cu=None, dtype=torch.float32, scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = (rnd(B, T, H, D) * 1.5).to(DEVICE, dtype), rnd(B, T, HKV, D).to(DEVICE, dtype), rnd(B, T, HKV, DV).to(
        DEVICE, dtype)
    leaves = [q, k, v]
    sl = None
    if sink_logits is not None:
        sl = rnd(*((H,) if sink_logits == 0 else (H, sink_logits))).to(DEVICE)
        leaves.append(sl)
    leaves = [x.requires_grad_() for x in leaves]
    km = key_mask.to(DEVICE) if key_mask is not None else None
    cu_t = torch.tensor(cu, device=DEVICE) if cu is not None else None
    do, dlse = rnd(B, T, H, DV).to(DEVICE), rnd(B, T, H).to(DEVICE)
    kwargs = dict(window=window, num_sink_tokens=sinks, scale=scale)

    o, lse = triton_window_attention(q, k, v, sink_logits=sl, key_mask=km, cu_seqlens=cu_t, **kwargs)
    loss = (o.float() * do).sum() + (torch.where(torch.isfinite(lse), lse, 0.) * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    ro, rl = naive_window_attention(*ref_leaves[:3], sink_logits=ref_leaves[3] if sl is not None else None,
                                    key_mask=km.cpu() if km is not None else None,
                                    cu_seqlens=cu_t.cpu() if cu_t is not None else None, **kwargs)
    rloss = (ro * do.double().cpu()).sum() + (torch.where(torch.isfinite(rl), rl, 0.) * dlse.double().cpu()).sum()
    ref_grads = torch.autograd.grad(rloss, ref_leaves)

    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, T, H)
    tol = TOL[dtype]
    errors = {"o": rel_err(o, ro), "lse": rel_err(lse, rl)}
    for name, leaf, got, want in zip(["dq", "dk", "dv", "dsink_logits"], leaves, grads, ref_grads):
        assert got.dtype == leaf.dtype
        errors[name] = rel_err(got, want)
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


def padding_mask(B, T):
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, :5] = False  # left padding: the first valid key (the sink) sits at position 5
    m[-1, 10:13] = False  # a hole in the middle
    return m


def test_gqa_padded_dims_partial_block():
    assert 40 % BLOCK_M != 0
    check_window()


def test_sink_tokens_and_sink_logits():
    check_window(sinks=3, sink_logits=0)


def test_sink_logits_matrix_with_key_mask():
    check_window(sinks=4, sink_logits=3, key_mask=padding_mask(2, 40))


def test_full_causal_with_key_mask():
    check_window(window=None, key_mask=padding_mask(2, 40), sink_logits=2)


def test_varlen_with_length_one_sequence():
    check_window(B=1, cu=[0, 1, 18, 40], sinks=2, sink_logits=0)


def test_varlen_full_causal():
    check_window(B=1, cu=[0, 1, 18, 40], window=None)


def test_bf16():
    check_window(B=1, sinks=2, sink_logits=0, dtype=torch.bfloat16)


def test_window_one_and_wide_window_equal_heads():
    check_window(B=1, window=1, sinks=1)
    check_window(B=1, H=2, HKV=2, D=20, DV=48, window=64, sinks=2, scale=0.3)


def test_dispatcher_routes_to_triton():
    q, k, v = (torch.randn(1, 9, 2, 16, device=DEVICE) for _ in range(3))
    o, lse = sliding_window_attention(q, k, v, window=4, num_sink_tokens=1, backend="triton")
    ro, rl = naive_window_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), window=4, num_sink_tokens=1)
    assert rel_err(o, ro) < 1e-4 and rel_err(lse, rl) < 1e-4


def test_rejects_fp64():
    q = torch.randn(1, 4, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError):
        triton_window_attention(q, q, q, window=2)


def test_nan_never_passes():
    with pytest.raises(AssertionError):
        rel_err(torch.tensor([1.0, float("nan")]), torch.ones(2))
    with pytest.raises(AssertionError):
        rel_err(torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("-inf")]))


@settings(max_examples=10, deadline=None)
@given(
    T=st.integers(1, 24),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    D=st.integers(3, 20),
    window=st.one_of(st.none(), st.integers(1, 30)),
    sinks=st.integers(0, 3),
    n_logits=st.sampled_from([None, 0, 2]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(T, heads, D, window, sinks, n_logits, seed):
    H, HKV = heads
    check_window(B=1, T=T, H=H, HKV=HKV, D=D, DV=D + 1, window=window, sinks=sinks, sink_logits=n_logits, seed=seed)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter run checks GPU compilation separately")
def test_kernels_compile_for_sm90():
    """Compile every window kernel for sm_90 without a GPU (catches what the interpreter cannot)."""
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from linearize.kernels.window import triton_chunk as w

        def compile_(kernel, consts):
            fn = kernel
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn
            types = {"cu": "*i32", "blocks": "*i32", "sp": "*i32", "km": "*i8", "window": "i32",
                     "qk_scale": "fp32", "scale": "fp32", "cap2": "fp32"}
            types.update({n: "*bf16" for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")})
            sig = {n: "constexpr" if n in consts else types.get(n, "*fp32") for n in fn.arg_names}
            triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))

        for cap in (False, True):  # CAP: Gemma-2's soft-capped scores
            base = dict(H=2, HKV=1, D=32, DV=32, BD=32, BDV=32, DOT=tl.bfloat16, CAP=cap)
            compile_(w._window_fwd_kernel, dict(base, BM=32, NS=4, BS=16, M=2, BSL=2, HAS_KM=True))
            compile_(w._window_dq_kernel, dict(base, BM=32, BN=16, NS=4, BS=16, HAS_KM=True))
            compile_(w._window_dkv_kernel, dict(base, BM=32, BN=16, HAS_KM=True))
            compile_(w._window_sink_dkv_kernel, dict(base, BN=16, NS=4, BS=16))
        print("compiled")
    """)
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
