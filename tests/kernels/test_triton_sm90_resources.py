"""Every Triton kernel, compiled for sm_90 at the benchmark head size (D = K = V = 128) with the
launch constants the launchers use on a GPU and the fixed launch config (4 warps, 2 stages,
what LINEARIZE_AUTOTUNE=0 runs), fits the 227 KiB of shared memory an H100/H200 block may use.
Autotuning prunes configs that do not fit; the fixed config has no fallback, so a GPU session
must not be the first to find out. No GPU needed."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from linearize.kernels.gla import triton_chunk as g, triton_recurrent as fr
    from linearize.kernels.window import triton_chunk as w
    from linearize.kernels.hybrid import triton_chunk as h

    LIMIT = 227 * 1024
    TYPES = {"cu": "*i32", "chunks": "*i32", "soff": "*i32", "sp": "*i32", "blocks": "*i32", "km": "*i8",
             "window": "i32", "NTOT": "i32", "scale": "fp32", "qk_scale": "fp32", "scale_lin": "fp32",
             "cap2": "fp32"}
    TYPES.update({n: "*bf16" for n in ("q", "k", "v", "g", "o", "do", "dq", "dk", "dv", "qw", "kw", "ql", "kl")})

    def compile_(name, kernel, consts):
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        sig = {n: "constexpr" if n in consts else TYPES.get(n, "*fp32") for n in fn.arg_names}
        c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        print(name, c.metadata.shared)
        assert c.metadata.shared <= LIMIT, f"{name}: {c.metadata.shared} B of shared memory > {LIMIT}"

    D = K = V = 128
    BT, BC, bf = g.CHUNK_SIZE, g.SUB_CHUNK_SIZE, tl.bfloat16
    BK, BV, BKg = g.block(K, g.MAX_BLOCK), g.block(V, g.MAX_BLOCK), g.block(K, g.DQKG_BLOCK_K)
    for scalar in (False, True):
        base = dict(H=32, HKV=8, K=K, V=V, BT=BT, SCALAR_G=scalar, DOT=bf)
        compile_(f"gla states {scalar}", g._gla_states_kernel, dict(HKV=8, K=K, V=V, BT=BT, BK=BK, BV=BV,
                 SCALAR_G=scalar, USE_H0=True, STORE_HT=True, STORE_GC=True, NORM=True, DOT=bf))
        compile_(f"gla fwd {scalar}", g._gla_fwd_kernel, dict(base, BC=BC, BK=g.block(K), BV=BV))
        compile_(f"gla dh {scalar}", g._gla_dh_kernel, dict(base, BK=BK, BV=BV, USE_DHT=True))
        compile_(f"gla dv {scalar}", g._gla_dv_kernel, dict(base, BC=BC, BK=g.block(K), BV=BV))
        compile_(f"gla dqkg {scalar}", g._gla_dqkg_kernel, dict(base, BC=BC, BK=BKg, BV=g.block(V)))
        compile_(f"gla recurrent {scalar}", fr._fused_recurrent_gla_kernel, dict(H=32, HKV=8, K=K, V=V,
                 BK=g.block(K), BV=g.block(V), SCALAR_G=scalar, USE_H0=True, STORE_HT=True))
        for shared in (False, True):
            compile_(f"hybrid {scalar} {shared}", h._hybrid_fwd_kernel, dict(H=32, HKV=8, D=D, K=K, V=V, BT=BT,
                     BC=BC, BN=w.BLOCK_M, BD=g.block(D), BK=g.block(K), BV=g.block(V), NS=4, BS=16, M=2, BSL=2,
                     HAS_KM=True, SCALAR_G=scalar, SHARED=shared, DOT=bf))
    for cap in (False, True):
        wb = dict(H=32, HKV=8, D=D, DV=V, BD=g.block(D), BDV=g.block(V), DOT=bf, CAP=cap)
        compile_(f"window fwd {cap}", w._window_fwd_kernel, dict(wb, BM=w.BLOCK_M, NS=4, BS=16, M=2, BSL=2,
                 HAS_KM=True))
        compile_(f"window dq {cap}", w._window_dq_kernel, dict(wb, BM=w.BLOCK_M, BN=w.BLOCK_N_BWD, NS=4, BS=16,
                 HAS_KM=True))
        compile_(f"window dkv {cap}", w._window_dkv_kernel, dict(wb, BM=w.BLOCK_M, BN=w.BLOCK_N_BWD, HAS_KM=True))
        compile_(f"window sink dkv {cap}", w._window_sink_dkv_kernel, dict(wb, BN=w.BLOCK_N_BWD, NS=4, BS=16))
    print("all fit")
""")


def test_benchmark_size_kernels_fit_sm90_shared_memory():
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "all fit" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
