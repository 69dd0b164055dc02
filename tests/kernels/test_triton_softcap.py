"""Soft-capped scores (Gemma-2: s -> c * tanh(s / c)) in the Triton window kernels, forward and
backward, against the fp64 reference; and the hybrid's capped path.

Runs in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before any kernel module
is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from linearize.kernels.hybrid import naive_hybrid_attention  # noqa: E402
from linearize.kernels.hybrid.triton_chunk import triton_hybrid_attention  # noqa: E402
from linearize.kernels.window.naive import naive_window_attention  # noqa: E402
from linearize.kernels.window.triton_chunk import triton_window_attention  # noqa: E402

CAP = 1.5


def rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "non-finite entries differ"
    return ((out[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def inputs(B, T, H, HKV, D, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return r(B, T, H, D) * spread, r(B, T, HKV, D) * spread, r(B, T, HKV, D)


@pytest.mark.parametrize("window, sinks, padded, sink_logits", [
    (7, 2, True, True),
    (None, 0, False, False),
    (5, 3, False, False),
])
def test_capped_window_forward_and_gradients(window, sinks, padded, sink_logits):
    B, T, H, HKV, D = 2, 40, 4, 2, 12
    q, k, v = inputs(B, T, H, HKV, D)
    key_mask = None
    if padded:
        key_mask = torch.ones(B, T, dtype=torch.bool)
        key_mask[1, :6] = False
    sl = torch.randn(H, 2, generator=torch.Generator().manual_seed(1)) if sink_logits else None
    kw = dict(window=window, num_sink_tokens=sinks, scale=0.25)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    sl_ref = None if sl is None else sl.double().requires_grad_()
    o_ref, lse_ref = naive_window_attention(*ref_in, sink_logits=sl_ref, key_mask=key_mask, softcap=CAP, **kw)
    dev = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    sl_dev = None if sl is None else sl.to(DEVICE).requires_grad_()
    o, lse = triton_window_attention(*dev, sink_logits=sl_dev, key_mask=None if key_mask is None else key_mask.to(DEVICE),
                                     softcap=CAP, **kw)
    assert rel(o, o_ref) < 1e-4 and rel(lse, lse_ref) < 1e-4
    gen = torch.Generator().manual_seed(2)
    do, dl = torch.randn(o.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    ((o_ref * do.double()).sum() + (lse_ref.nan_to_num(0., 0., 0.) * dl.double()).sum()).backward()
    ((o * do.to(DEVICE)).sum() + (lse.nan_to_num(0., 0., 0.) * dl.to(DEVICE)).sum()).backward()
    for a, b in zip(dev + ([sl_dev] if sl is not None else []), ref_in + ([sl_ref] if sl is not None else [])):
        assert rel(a.grad, b.grad) < 1e-4
    uncapped, _ = naive_window_attention(*[x.double() for x in (q, k, v)], key_mask=key_mask,
                                         sink_logits=None if sl is None else sl.double(), **kw)
    assert rel(o, uncapped) > 0.1


def test_uncapped_kernel_is_unchanged():
    q, k, v = (x.to(DEVICE) for x in inputs(1, 20, 2, 1, 8))
    a = triton_window_attention(q, k, v, window=6, num_sink_tokens=1)
    b = triton_window_attention(q, k, v, window=6, num_sink_tokens=1, softcap=None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["mix", "shared"])
def test_capped_hybrid(mode):
    B, T, H, HKV, D, K = 2, 23, 4, 2, 8, 6
    q, k, v = inputs(B, T, H, HKV, D)
    gen = torch.Generator().manual_seed(3)
    ql = torch.softmax(torch.randn(B, T, H, K, generator=gen), -1)
    kl = torch.softmax(torch.randn(B, T, HKV, K, generator=gen), -1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HKV, generator=gen) + 2)
    kw = dict(window=5, mode=mode, num_sink_tokens=1, softcap=CAP)
    ref, _ = naive_hybrid_attention(*[x.double() for x in (q, k, v, ql, kl, g)], **kw)
    o, _ = triton_hybrid_attention(*[x.to(DEVICE) for x in (q, k, v, ql, kl, g)], **kw)
    assert rel(o, ref) < 1e-4
