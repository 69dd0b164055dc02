"""LoLCATs' published hybrid: the composed op (window op + row max + GLA over delayed keys +
shared denominator) against the dense per-query reference written from the equation."""
import pytest
import torch

from linearize.kernels import past_window_attention, window_max_score
from linearize.kernels.tolerances import tolerance

BOUND = tolerance("hybrid", "torch", "float32")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(B=2, T=29, H=4, HKV=2, D=8, F=6, V=5, key_heads=4, gate=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    q_win, k_win, v = r(B, T, H, D), r(B, T, HKV, D), r(B, T, HKV, V)
    q_lin = torch.softmax(r(B, T, H, F), -1)
    k_lin = torch.softmax(r(B, T, key_heads, F), -1)
    g = None
    if gate == "head":
        g = -torch.rand(B, T, key_heads, generator=gen, dtype=dtype) * 0.5
    elif gate == "channel":
        g = -torch.rand(B, T, key_heads, F, generator=gen, dtype=dtype) * 0.5
    gam = torch.rand(H, generator=gen, dtype=dtype) * 0.9 + 0.05
    lam = torch.rand(H, generator=gen, dtype=dtype) * 2
    return q_win, k_win, v, q_lin, k_lin, g, gam, lam


def left_padding(B, T, pads=(0, 6)):
    mask = torch.ones(B, T, dtype=torch.bool)
    for row, p in enumerate(pads[:B]):
        mask[row, :p] = False
    return mask


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("gate", [None, "head", "channel"])
@pytest.mark.parametrize("key_heads", [4, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_composed_equals_reference_fp64(sinks, gate, key_heads, padded):
    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs(key_heads=key_heads, gate=gate)
    key_mask = left_padding(2, 29) if padded else None
    kw = dict(window=5, num_sink_tokens=sinks, window_factor=gam, linear_factor=lam, key_mask=key_mask)
    ref = past_window_attention(q_win, k_win, v, q_lin, k_lin, g, backend="naive", **kw)
    out = past_window_attention(q_win, k_win, v, q_lin, k_lin, g, backend="torch", **kw)
    real = slice(None) if key_mask is None else key_mask
    assert rel(out[real], ref[real]) < 1e-12


def test_packed_sequences_and_a_length_one_sequence():
    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs(B=1, gate="head")
    cu = torch.tensor([0, 1, 9, 29])
    kw = dict(window=4, num_sink_tokens=2, window_factor=gam, linear_factor=lam, cu_seqlens=cu)
    ref = past_window_attention(q_win, k_win, v, q_lin, k_lin, g, backend="naive", **kw)
    out = past_window_attention(q_win, k_win, v, q_lin, k_lin, g, backend="torch", **kw)
    assert rel(out, ref) < 1e-12
    alone = past_window_attention(q_win[:, 9:], k_win[:, 9:], v[:, 9:], q_lin[:, 9:], k_lin[:, 9:], g[:, 9:],
                                  backend="torch", **{**kw, "cu_seqlens": None})
    assert rel(out[:, 9:], alone) < 1e-12


def test_linear_terms_only_see_keys_past_the_window():
    """With gamma ~ 0, a query that has linear keys depends only on keys at least `window`
    back: changing a value still inside its window cannot move it."""
    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs(B=1, T=12)
    tiny = torch.full_like(gam, 1e-30)
    base = past_window_attention(q_win, k_win, v, q_lin, k_lin, None, window=4, window_factor=tiny, linear_factor=lam)
    v2 = v.clone()
    v2[:, 8] += 10.0
    moved = past_window_attention(q_win, k_win, v2, q_lin, k_lin, None, window=4, window_factor=tiny,
                                  linear_factor=lam)
    assert torch.allclose(moved[:, :12], base[:, :12], atol=1e-12, rtol=0)  # 8 + 4 > 11: never left the window
    v2[:, 2] += 10.0
    moved = past_window_attention(q_win, k_win, v2, q_lin, k_lin, None, window=4, window_factor=tiny,
                                  linear_factor=lam)
    assert torch.allclose(moved[:, 4:6], base[:, 4:6], atol=1e-12, rtol=0)  # linear keys 0..1 only
    assert not torch.allclose(moved[:, 6:], base[:, 6:])


def test_zero_linear_factor_is_the_window_softmax():
    from linearize.kernels import sliding_window_attention

    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs()
    out = past_window_attention(q_win, k_win, v, q_lin, k_lin, g, window=5, num_sink_tokens=2, window_factor=gam,
                                linear_factor=torch.zeros_like(lam))
    win, _ = sliding_window_attention(q_win, k_win, v, window=5, num_sink_tokens=2)
    assert rel(out, win) < 1e-13


def test_fp32_and_gradients_against_reference():
    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs(T=21, gate="head", key_heads=4)
    key_mask = left_padding(2, 21, pads=(0, 4))
    leaves64 = [t.clone().requires_grad_() for t in (q_win, k_win, v, q_lin, k_lin, g, gam, lam)]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    kw = dict(window=4, num_sink_tokens=1, key_mask=key_mask)
    ref = past_window_attention(*leaves64[:6], window_factor=leaves64[6], linear_factor=leaves64[7], backend="naive",
                                **kw)
    out = past_window_attention(*leaves32[:6], window_factor=leaves32[6], linear_factor=leaves32[7], backend="torch",
                                **kw)
    assert out.dtype == torch.float32
    w = torch.randn_like(ref) * key_mask[..., None, None]
    (ref * w).sum().backward()
    (out * w.float()).sum().backward()
    assert rel(out.double()[key_mask], ref[key_mask]) < BOUND.forward
    for name, a, b in zip(("q_win", "k_win", "v", "q_lin", "k_lin", "g", "gamma", "lam"), leaves32, leaves64):
        assert rel(a.grad.double(), b.grad) < BOUND.gradients, name


@pytest.mark.parametrize("sinks", [0, 2])
def test_row_max_matches_dense(sinks):
    q_win, k_win, *_ = inputs(T=150)
    key_mask = left_padding(2, 150, pads=(0, 70))
    for km in (None, key_mask):
        ref = window_max_score(q_win, k_win, window=9, num_sink_tokens=sinks, key_mask=km, backend="naive")
        out = window_max_score(q_win, k_win, window=9, num_sink_tokens=sinks, key_mask=km, backend="torch")
        real = slice(None) if km is None else km
        assert torch.allclose(out[real], ref[real], rtol=1e-13, atol=1e-13)
        if km is not None:
            assert torch.isneginf(out[~km]).all()


def test_triton_path_in_the_interpreter_forward_and_gradients():
    """On CUDA the same composition runs the Triton window and GLA kernels; here they run in
    the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    q_win, k_win, v, q_lin, k_lin, g, gam, lam = inputs(T=13, gate="head", key_heads=4, dtype=torch.float32)
    key_mask = left_padding(2, 13, pads=(0, 3))
    kw = dict(window=4, num_sink_tokens=1, key_mask=key_mask)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q_win, k_win, v, q_lin, k_lin, g, gam, lam)]
        out = past_window_attention(*leaves[:6], window_factor=leaves[6], linear_factor=leaves[7], backend=backend,
                                    **kw)
        (out * key_mask[..., None, None]).square().sum().backward()
        grads[backend] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(grads["triton"], grads["torch"]):
        assert rel(a, b) < 1e-5
