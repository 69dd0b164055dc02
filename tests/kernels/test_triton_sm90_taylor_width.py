"""The GLA Triton kernels at Based's feature width: K = 1 + 16 + 16^2 = 273 key features (tiles
of 512 where a kernel takes the whole key width), V = 128 + 1 (the normalizer's column), bf16,
compiled for sm_90 with the fixed launch config (4 warps, 2 stages), fit the 227 KiB of shared
memory an H100/H200 block may use. The benchmark-size check (`test_triton_sm90_resources.py`)
covers K = 128 only. No GPU needed."""
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

    LIMIT = 227 * 1024
    TYPES = {"cu": "*i32", "chunks": "*i32", "soff": "*i32", "NTOT": "i32", "scale": "fp32"}
    TYPES.update({n: "*bf16" for n in ("q", "k", "v", "g", "o", "do", "dq", "dk", "dv")})

    def compile_(name, kernel, consts):
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        sig = {n: "constexpr" if n in consts else TYPES.get(n, "*fp32") for n in fn.arg_names}
        c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        print(name, c.metadata.shared)
        assert c.metadata.shared <= LIMIT, f"{name}: {c.metadata.shared} B of shared memory > {LIMIT}"

    K, V = 273, 129
    BT, BC, bf = g.CHUNK_SIZE, g.SUB_CHUNK_SIZE, tl.bfloat16
    BK, BV, BKg = g.block(K, g.MAX_BLOCK), g.block(V, g.MAX_BLOCK), g.block(K, g.DQKG_BLOCK_K)
    base = dict(H=32, HKV=8, K=K, V=V, BT=BT, SCALAR_G=True, DOT=bf)
    compile_("gla states", g._gla_states_kernel, dict(HKV=8, K=K, V=V, BT=BT, BK=BK, BV=BV, SCALAR_G=True,
             USE_H0=True, STORE_HT=True, STORE_GC=True, NORM=True, DOT=bf))
    compile_("gla fwd", g._gla_fwd_kernel, dict(base, BC=BC, BK=g.block(K), BV=BV))
    compile_("gla dh", g._gla_dh_kernel, dict(base, BK=BK, BV=BV, USE_DHT=True))
    compile_("gla dv", g._gla_dv_kernel, dict(base, BC=BC, BK=g.block(K), BV=BV))
    compile_("gla dqkg", g._gla_dqkg_kernel, dict(base, BC=BC, BK=BKg, BV=g.block(V)))
    compile_("gla recurrent", fr._fused_recurrent_gla_kernel, dict(H=32, HKV=8, K=K, V=V, BK=g.block(K),
             BV=g.block(V), SCALAR_G=True, USE_H0=True, STORE_HT=True))
    print("all fit")
""")


def test_taylor_width_gla_kernels_fit_sm90_shared_memory():
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("this Triton build has no NVIDIA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "all fit" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
