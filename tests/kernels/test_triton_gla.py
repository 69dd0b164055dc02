"""Triton GLA kernels (chunked forward/backward, fused recurrent) against the fp64 reference.

Runs in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before any kernel module
is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
Shapes are tiny on purpose; CHUNK_SIZE is 32 when interpreting, so T=40 spans two chunks
(the second one partial) and the per-channel path runs two 16-row sub-chunks.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from linearize.kernels import gated_linear_attention  # noqa: E402
from linearize.kernels.gla.triton_recurrent import fused_recurrent_gla  # noqa: E402
from linearize.kernels.gla.naive import naive_gla  # noqa: E402
from linearize.kernels.gla.triton_chunk import CHUNK_SIZE, triton_chunk_gla  # noqa: E402
from linearize.kernels.tolerances import tolerance  # noqa: E402

TOL = {dt: tolerance("gla", "triton", dt).forward for dt in (torch.float32, torch.bfloat16)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; any NaN/inf in out fails outright."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    ref = ref.detach().double().cpu()
    return ((out.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HKV, K, V, *, scalar, dtype, decay="normal", n_states=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = rnd(B, T, H, K), rnd(B, T, HKV, K), rnd(B, T, HKV, V)
    gshape = (B, T, HKV) if scalar else (B, T, HKV, K)
    if decay == "zero":
        g = torch.zeros(gshape)
    elif decay == "strong":
        g = F.logsigmoid(rnd(*gshape) - 2.0) * 8.0  # about -17 per step on average
    else:
        g = F.logsigmoid(rnd(*gshape) + 2.0)
    h0 = rnd(n_states, HKV, K, V) if n_states else None
    cast = lambda x: x.to(device=DEVICE, dtype=dtype)
    return cast(q), cast(k), cast(v), cast(g), (h0.to(DEVICE) if h0 is not None else None)


def check_gla(B=2, T=40, H=4, HKV=2, K=48, V=20, *, scalar=False, dtype=torch.float32, decay="normal",
              cu=None, h0=True, scale=0.3, seed=0):
    N = B if cu is None else len(cu) - 1
    q, k, v, g, s0 = make_inputs(B, T, H, HKV, K, V, scalar=scalar, dtype=dtype, decay=decay,
                                 n_states=N if h0 else None, seed=seed)
    cu_t = torch.tensor(cu, device=DEVICE) if cu is not None else None
    leaves = [x.requires_grad_() for x in (q, k, v, g) + ((s0,) if h0 else ())]
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, HKV, K, V, generator=gen).to(DEVICE)

    o, ht = triton_chunk_gla(q, k, v, g, scale=scale, initial_state=s0, output_final_state=True, cu_seqlens=cu_t)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves)

    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    ro, rht = naive_gla(*ref_leaves[:4], scale=scale, initial_state=ref_leaves[4] if h0 else None,
                        output_final_state=True, cu_seqlens=cu_t.cpu() if cu_t is not None else None)
    ref_grads = torch.autograd.grad((ro * do.double().cpu()).sum() + (rht * dht.double().cpu()).sum(), ref_leaves)

    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (N, HKV, K, V)
    tol = TOL[dtype]
    errors = {"o": rel_err(o, ro), "final_state": rel_err(ht, rht)}
    for name, leaf, got, want in zip(["dq", "dk", "dv", "dg", "dh0"], leaves, grads, ref_grads):
        assert got.dtype == leaf.dtype, (name, got.dtype, leaf.dtype)
        errors[name] = rel_err(got, want)
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("scalar", [False, True], ids=["per_channel", "per_head"])
def test_gqa_padded_dims_partial_chunk(scalar):
    # T = 40 is not a multiple of the chunk, K = 48 and V = 20 are not powers of two, H != HKV
    assert 40 % CHUNK_SIZE != 0
    check_gla(B=1 if not scalar else 2, scalar=scalar)


@pytest.mark.parametrize("scalar", [False, True], ids=["per_channel", "per_head"])
def test_strong_decay(scalar):
    check_gla(B=1, H=2, HKV=1, scalar=scalar, decay="strong")


def test_zero_decay():
    check_gla(B=1, H=2, HKV=1, K=20, V=48, decay="zero")


@pytest.mark.parametrize("scalar", [False, True], ids=["per_channel", "per_head"])
def test_varlen_with_length_one_sequence(scalar):
    # sequences of length 1, 17 and 22: states restart, the length-1 one is a single partial chunk
    check_gla(B=1, T=40, H=2, HKV=1, cu=[0, 1, 18, 40], scalar=scalar)


@pytest.mark.parametrize("scalar", [False, True], ids=["per_channel", "per_head"])
def test_bf16(scalar):
    check_gla(B=1, H=2, HKV=1, scalar=scalar, dtype=torch.bfloat16)


def test_no_initial_state_equal_heads():
    check_gla(B=1, T=33, H=2, HKV=2, K=20, V=48, h0=False, scalar=True)


def test_varlen_equals_separate_calls():
    q, k, v, g, _ = make_inputs(1, 40, 2, 1, 20, 20, scalar=False, dtype=torch.float32)
    cu = torch.tensor([0, 1, 18, 40], device=DEVICE)
    o, ht = triton_chunk_gla(q, k, v, g, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        on, hn = triton_chunk_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], output_final_state=True)
        assert torch.allclose(o[:, a:b], on, atol=1e-6, rtol=1e-5)
        assert torch.allclose(ht[n], hn[0], atol=1e-6, rtol=1e-5)


def test_dispatcher_routes_to_triton():
    q, k, v, g, _ = make_inputs(1, 9, 2, 1, 16, 16, scalar=True, dtype=torch.float32)
    o, _ = gated_linear_attention(q, k, v, g, backend="triton")
    ref, _ = naive_gla(q.double().cpu(), k.double().cpu(), v.double().cpu(), g.double().cpu())
    assert rel_err(o, ref) < 1e-4


def test_rejects_fp64_and_huge_heads():
    q, k, v, g, _ = make_inputs(1, 4, 1, 1, 16, 16, scalar=True, dtype=torch.float64)
    with pytest.raises(TypeError):
        triton_chunk_gla(q, k, v, g)
    q, k, v, g, _ = make_inputs(1, 2, 1, 1, 300, 16, scalar=True, dtype=torch.float32)
    with pytest.raises(ValueError):
        triton_chunk_gla(q, k, v, g)


@pytest.mark.parametrize("scalar", [False, True], ids=["per_channel", "per_head"])
@pytest.mark.parametrize("cu", [None, [0, 1, 4, 7]], ids=["batched", "varlen"])
def test_fused_recurrent_decode(scalar, cu):
    B, T = (2, 3) if cu is None else (1, 7)
    N = B if cu is None else len(cu) - 1
    q, k, v, g, s0 = make_inputs(B, T, 4, 2, 20, 48, scalar=scalar, dtype=torch.float32, n_states=N)
    cu_t = torch.tensor(cu, device=DEVICE) if cu is not None else None
    with torch.no_grad():
        o, ht = fused_recurrent_gla(q, k, v, g, scale=0.5, initial_state=s0, output_final_state=True, cu_seqlens=cu_t)
    ro, rht = naive_gla(q.double().cpu(), k.double().cpu(), v.double().cpu(), g.double().cpu(), scale=0.5,
                        initial_state=s0.double().cpu(), output_final_state=True,
                        cu_seqlens=cu_t.cpu() if cu_t is not None else None)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rht) < 1e-5


def test_fused_recurrent_bf16_and_refuses_grad():
    q, k, v, g, s0 = make_inputs(2, 2, 2, 1, 16, 16, scalar=False, dtype=torch.bfloat16, n_states=2)
    with torch.no_grad():
        o, ht = fused_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    ro, rht = naive_gla(q.double().cpu(), k.double().cpu(), v.double().cpu(), g.double().cpu(),
                        initial_state=s0.double().cpu(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and rel_err(o, ro) < 2e-2 and rel_err(ht, rht) < 1e-4
    with pytest.raises(RuntimeError, match="forward only"):
        fused_recurrent_gla(q.float().requires_grad_(), k.float(), v.float(), g.float())


def test_nan_never_passes():
    assert rel_err(torch.ones(3), torch.ones(3)) == 0.0
    with pytest.raises(AssertionError):
        rel_err(torch.tensor([1.0, float("nan")]), torch.ones(2))


@settings(max_examples=10, deadline=None)
@given(
    T=st.integers(1, 20),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    K=st.integers(3, 20),
    V=st.integers(3, 20),
    scalar=st.booleans(),
    h0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(T, heads, K, V, scalar, h0, seed):
    H, HKV = heads
    check_gla(B=1, T=T, H=H, HKV=HKV, K=K, V=V, scalar=scalar, h0=h0, seed=seed)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter run checks GPU compilation separately")
def test_kernels_compile_for_sm90():
    """The interpreter cannot see GPU-only compile errors (loop-carried type changes, tl.dot
    shapes); compile every kernel for sm_90 ahead of time, without a GPU, in a subprocess
    (small tiles and one pipeline stage to keep it quick)."""
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from linearize.kernels.gla import triton_chunk as m
        from linearize.kernels.gla import triton_recurrent as fr

        def compile_(kernel, consts):
            fn = kernel
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn
            types = {"cu": "*i32", "chunks": "*i32", "soff": "*i32", "scale": "fp32", "NTOT": "i32"}
            types.update({n: "*bf16" for n in ("q", "k", "v", "g", "o", "do", "dq", "dk", "dv")})
            sig = {n: "constexpr" if n in consts else types.get(n, "*fp32") for n in fn.arg_names}
            triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))

        for scalar in (False, True):
            base = dict(H=2, HKV=1, K=32, V=32, BT=32, SCALAR_G=scalar, DOT=tl.bfloat16)
            compile_(m._gla_states_kernel, dict(HKV=1, K=32, V=32, BT=32, BK=32, BV=32, SCALAR_G=scalar,
                     USE_H0=True, STORE_HT=True, STORE_GC=True, NORM=True, DOT=tl.bfloat16))
            compile_(m._gla_fwd_kernel, dict(base, BC=16, BK=32, BV=32))
            compile_(m._gla_dh_kernel, dict(base, BK=32, BV=32, USE_DHT=True))
            compile_(m._gla_dv_kernel, dict(base, BC=16, BK=32, BV=32))
            compile_(m._gla_dqkg_kernel, dict(base, BC=16, BK=32, BV=32))
            compile_(fr._fused_recurrent_gla_kernel, dict(H=2, HKV=1, K=32, V=32, BK=32, BV=32,
                     SCALAR_G=scalar, USE_H0=True, STORE_HT=True))
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no NVIDIA backend to compile for")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
