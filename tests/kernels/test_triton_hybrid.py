"""Hybrid window + GLA: the fp64 reference against the formulas it implements, and the fused
Triton forward (plus its recomputing backward) against the reference.

Runs in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before any kernel module
is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from linearize.kernels.gla.naive import naive_gla  # noqa: E402
from linearize.kernels.hybrid import naive_hybrid_attention  # noqa: E402
from linearize.kernels.window.naive import naive_window_attention, window_mask  # noqa: E402
from linearize.kernels.tolerances import tolerance  # noqa: E402

TOL = {dt: tolerance("hybrid", "triton", dt).forward for dt in (torch.float32, torch.bfloat16)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    ref = ref.detach().double().cpu()
    return ((out.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HKV, D, K, V, *, scalar, shared, dtype, device="cpu", seed=0, decay=2.0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q_win, k_win, v = rnd(B, T, H, D), rnd(B, T, HKV, D), rnd(B, T, HKV, V)
    q_lin, k_lin = rnd(B, T, H, K), rnd(B, T, HKV, K)
    if shared:  # non-negative features, as the shared denominator assumes
        q_lin, k_lin = q_lin.softmax(-1), k_lin.softmax(-1)
    g = F.logsigmoid(rnd(*((B, T, HKV) if scalar else (B, T, HKV, K))) + decay)
    return [x.to(device=device, dtype=dtype) for x in (q_win, k_win, v, q_lin, k_lin, g)]


# ---------------------------------------------------------------- reference semantics (no Triton)

def test_mix_is_the_weighted_sum_of_both_references():
    qw, kw, v, ql, kl, g = make_inputs(2, 17, 4, 2, 8, 6, 5, scalar=False, shared=False, dtype=torch.float64)
    w_win, w_lin = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    o, _ = naive_hybrid_attention(qw, kw, v, ql, kl, g, window=4, mode="mix", num_sink_tokens=1, w_win=w_win,
                                  w_lin=w_lin, scale_lin=0.5)
    ow, _ = naive_window_attention(qw, kw, v, window=4, num_sink_tokens=1)
    ol, _ = naive_gla(ql, kl, v, g, scale=0.5)
    assert torch.allclose(o, w_win[:, None] * ow + w_lin[:, None] * ol, atol=1e-12)
    o_default, _ = naive_hybrid_attention(qw, kw, v, ql, kl, g, window=4, num_sink_tokens=1, scale_lin=0.5)
    assert torch.allclose(o_default, 0.5 * ow + 0.5 * ol, atol=1e-12)


def dense_shared_denominator(qw, kw, v, ql, kl, c, window, scale):
    """LoLCATs written out densely (no decay): one softmax denominator over window + linear."""
    B, T, H, _ = qw.shape
    G = H // kw.shape[2]
    kw, v, kl = (x.repeat_interleave(G, dim=2) for x in (kw, v, kl))
    allowed = window_mask(T, window, 0)[0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    e = torch.exp(torch.einsum("bthd,bshd->bhts", qw, kw) * scale).masked_fill(~allowed, 0)
    a = torch.einsum("bthk,bshk->bhts", ql, kl).masked_fill(~causal, 0) * c[None, :, None, None]
    num = torch.einsum("bhts,bshv->bthv", e + a, v)
    den = (e + a).sum(-1).transpose(1, 2)
    return num / den[..., None]


def test_shared_denominator_matches_the_lolcats_formula():
    qw, kw, v, ql, kl, _ = make_inputs(2, 19, 4, 2, 8, 6, 5, scalar=True, shared=True, dtype=torch.float64)
    g = torch.zeros(2, 19, 2, dtype=torch.float64)
    c = torch.tensor([0.0, 0.3, 1.0, 5.0], dtype=torch.float64)
    o, _ = naive_hybrid_attention(qw, kw, v, ql, kl, g, window=5, mode="shared", c=c, scale_win=0.4)
    assert torch.allclose(o, dense_shared_denominator(qw, kw, v, ql, kl, c, 5, 0.4), atol=1e-10)
    ow, _ = naive_window_attention(qw, kw, v, window=5, scale=0.4)
    assert torch.allclose(o[:, :, 0], ow[:, :, 0], atol=1e-12)  # c = 0: the window alone


def test_shared_denominator_is_stable_for_huge_scores():
    qw, kw, v, ql, kl, g = make_inputs(1, 12, 2, 1, 8, 6, 5, scalar=False, shared=True, dtype=torch.float32)
    for s in (1e3, -1e3):
        o, _ = naive_hybrid_attention(qw * s, kw, v, ql, kl, g, window=3, mode="shared", c=2.0)
        assert torch.isfinite(o).all()


def test_shared_gradient_of_c_at_zero_is_the_true_one():
    qw, kw, v, ql, kl, g = make_inputs(1, 9, 2, 1, 8, 6, 5, scalar=True, shared=True, dtype=torch.float64)
    c = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    o, _ = naive_hybrid_attention(qw, kw, v, ql, kl, g, window=3, mode="shared", c=c)
    (dc,) = torch.autograd.grad(o.sum(), c)
    eps = 1e-6
    o_eps, _ = naive_hybrid_attention(qw, kw, v, ql, kl, g, window=3, mode="shared", c=torch.full((2,), eps,
                                                                                                  dtype=torch.float64))
    fd = (o_eps - o.detach()).sum((0, 1, 3)) / eps
    assert torch.allclose(dc, fd, rtol=1e-4, atol=1e-8) and (dc.abs() > 0).all()


def test_bad_mode_and_mismatched_heads_raise():
    qw, kw, v, ql, kl, g = make_inputs(1, 4, 2, 1, 8, 6, 5, scalar=True, shared=False, dtype=torch.float32)
    with pytest.raises(ValueError):
        naive_hybrid_attention(qw, kw, v, ql, kl, g, window=2, mode="sum")
    with pytest.raises(ValueError):
        naive_hybrid_attention(qw, kw, v, ql[:, :, :1], kl, g, window=2)


# ---------------------------------------------------------------- fused Triton kernel

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:
    HAVE_TRITON = False
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not HAVE_TRITON or (not INTERPRET and not torch.cuda.is_available()),
                                  reason="needs Triton (interpreter on the CPU, or a CUDA device)")


def check_hybrid(B=1, T=40, H=2, HKV=1, D=20, K=48, V=20, *, mode="mix", scalar=True, window=7, sinks=0,
                 sink_logits=None, key_mask=None, cu=None, h0=False, dtype=torch.float32, weights="tensor",
                 zero_c=False, seed=0):
    from linearize.kernels.hybrid import triton_hybrid_attention

    shared = mode == "shared"
    inputs = make_inputs(B, T, H, HKV, D, K, V, scalar=scalar, shared=shared, dtype=dtype, device=DEVICE, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    names, leaves, kw = ["q_win", "k_win", "v", "q_lin", "k_lin", "g"], list(inputs), {}
    if weights == "tensor":
        if shared:
            c = torch.rand(H, generator=gen) * 2
            if zero_c:
                c[0] = 0.0
            kw["c"] = c.to(DEVICE)
        else:
            kw["w_win"], kw["w_lin"] = torch.rand(H, generator=gen).to(DEVICE), torch.rand(H, generator=gen).to(DEVICE)
        names += list(kw)
        leaves += list(kw.values())
    if sink_logits is not None:
        kw["sink_logits"] = torch.randn(*((H,) if sink_logits == 0 else (H, sink_logits)), generator=gen).to(DEVICE)
        names.append("sink_logits")
        leaves.append(kw["sink_logits"])
    N = B if cu is None else len(cu) - 1
    if h0:
        kw["initial_state"] = torch.rand(N, HKV, K, V + shared, generator=gen).to(DEVICE)
        names.append("initial_state")
        leaves.append(kw["initial_state"])
    for x in leaves:
        x.requires_grad_()
    opts = dict(window=window, mode=mode, num_sink_tokens=sinks, scale_lin=0.7, output_final_state=True,
                key_mask=key_mask.to(DEVICE) if key_mask is not None else None,
                cu_seqlens=torch.tensor(cu, device=DEVICE) if cu is not None else None)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, HKV, K, V + shared, generator=gen).to(DEVICE)

    o, ht = triton_hybrid_attention(*leaves[:6], **kw, **opts)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves)

    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    ref_kw = dict(zip(names[6:], ref_leaves[6:]))
    ref_opts = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in opts.items()}
    ro, rht = naive_hybrid_attention(*ref_leaves[:6], **ref_kw, **ref_opts)
    ref_grads = torch.autograd.grad((ro * do.double().cpu()).sum() + (rht * dht.double().cpu()).sum(), ref_leaves)

    assert o.dtype == dtype and o.shape == (B, T, H, V) and ht.shape == (N, HKV, K, V + shared)
    tol = TOL[dtype]
    errors = {"o": rel_err(o, ro), "final_state": rel_err(ht, rht)}
    for name, got, want in zip(names, grads, ref_grads):
        errors["d" + name] = rel_err(got, want)
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


@needs_triton
def test_mix_per_head_gate_gqa():
    # per-head gate: one chunk-sized row block per program; T = 40 is not a multiple of it
    check_hybrid(B=2, H=4, HKV=2, mode="mix", scalar=True)


@needs_triton
def test_mix_per_channel_gate_sinks_and_key_mask():
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, :5] = False
    check_hybrid(mode="mix", scalar=False, sinks=2, sink_logits=2, key_mask=mask)


@needs_triton
def test_shared_per_channel_gate():
    # per-channel gate: 16-row sub-chunk blocks, the window runs on the same rows
    check_hybrid(mode="shared", scalar=False)


@needs_triton
def test_shared_varlen_initial_state_zero_c():
    check_hybrid(H=4, HKV=2, mode="shared", scalar=True, cu=[0, 1, 18, 40], h0=True, sinks=1, sink_logits=0,
                 zero_c=True)


@needs_triton
def test_liger_defaults_full_causal():
    check_hybrid(mode="mix", scalar=True, window=None, weights="floats", T=33)


@needs_triton
@pytest.mark.parametrize("mode", ["mix", "shared"])
def test_bf16(mode):
    check_hybrid(mode=mode, scalar=True, dtype=torch.bfloat16)


@needs_triton
def test_forward_without_grad_matches_reference():
    from linearize.kernels.hybrid import triton_hybrid_attention

    inputs = make_inputs(1, 21, 2, 1, 20, 48, 20, scalar=False, shared=True, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        o, ht = triton_hybrid_attention(*inputs, window=5, mode="shared", c=0.5)
    ro, _ = naive_hybrid_attention(*[x.double().cpu() for x in inputs], window=5, mode="shared", c=0.5)
    assert ht is None and rel_err(o, ro) < 1e-4


@needs_triton
@pytest.mark.skipif(not INTERPRET, reason="the interpreter run checks GPU compilation separately")
def test_kernel_compiles_for_sm90():
    """Compile the fused kernel for sm_90 without a GPU (catches what the interpreter cannot)."""
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from linearize.kernels.hybrid import triton_chunk as m

        fn = m._hybrid_fwd_kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        types = {"cu": "*i32", "chunks": "*i32", "soff": "*i32", "sp": "*i32", "km": "*i8", "window": "i32",
                 "qk_scale": "fp32", "scale_lin": "fp32"}
        types.update({n: "*bf16" for n in ("qw", "kw", "v", "ql", "kl", "g", "o")})
        for scalar in (False, True):
            for shared in (False, True):
                consts = dict(H=2, HKV=1, D=32, K=32, V=32, BT=32, BC=16, BN=32, BD=32, BK=32, BV=32, NS=2, BS=16,
                              M=2, BSL=2, HAS_KM=True, SCALAR_G=scalar, SHARED=shared, DOT=tl.bfloat16)
                sig = {n: "constexpr" if n in consts else types.get(n, "*fp32") for n in fn.arg_names}
                triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
        print("compiled")
    """)
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
