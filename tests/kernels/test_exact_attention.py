"""exact_attention (the head-level hybrid's kept heads) against the dense fp64 reference: the
window op's reference with no window, run over the past and the new tokens together, read at
the new queries. A padded query also sees itself in exact_attention (no empty row), so the
comparison covers the real queries and asks the padded ones only to stay finite."""
import pytest
import torch

from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)
from linearize.kernels.tolerances import tolerance
from linearize.kernels.window.full import exact_attention
from linearize.kernels.window.naive import naive_window_attention

F64 = torch.float64
BOUND = tolerance("window", "torch", "float32")  # exact attention is the window op without a window


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN never passes."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert not torch.isnan(a).any(), "NaN"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def key_padding(B, L, seed):
    """Left padding on row 0, random holes elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=gen) > 0.25
    mask[0, : L // 3] = False
    return mask


def compare(B, T, L, H, HKV, D, *, dtype=torch.float32, padded=False, cu_seqlens=None, softcap=None, scale=None,
            seed=0):
    """Relative errors {'o', 'dq', 'dk', 'dv'} of exact_attention vs the fp64 reference on the same
    rounded inputs: T new queries over L keys (the past L - T, then the new tokens)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(B, L, HKV, D, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(B, L, HKV, D, generator=gen, dtype=F64).to(dtype)
    valid = key_padding(B, L, seed) if padded else None
    scale = D ** -0.5 if scale is None else scale
    real = torch.ones(B, T, dtype=torch.bool) if valid is None else valid[:, L - T:]
    do = torch.randn(B, T, H, D, generator=gen, dtype=F64) * real[:, :, None, None]

    ref = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    q_all = torch.cat([ref[0].new_zeros(B, L - T, H, D), ref[0]], dim=1)
    o_ref = naive_window_attention(q_all, ref[1], ref[2], window=None, scale=scale, key_mask=valid,
                                   cu_seqlens=cu_seqlens, softcap=softcap)[0][:, L - T:]
    g_ref = torch.autograd.grad((o_ref * do).sum(), ref)

    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o = exact_attention(*xs, valid, scale=scale, cu_seqlens=cu_seqlens, softcap=softcap)
    assert o.dtype == q.dtype and o.shape == (B, T, H, D)
    assert torch.isfinite(o).all()
    grads = torch.autograd.grad((o * do.to(o.dtype)).sum(), xs)
    out = {"o": rel(o[real], o_ref[real])}
    out.update({n: rel(a, b) for n, a, b in zip(["dq", "dk", "dv"], grads, g_ref)})
    return out


def assert_below(errors: dict, forward: float, gradients: float):
    bad = {k: e for k, e in errors.items() if not e < (forward if k == "o" else gradients)}
    assert not bad, f"relative errors above the bound: {bad} (all: {errors})"


@pytest.mark.parametrize(
    "B, T, L, H, HKV, padded, softcap",
    [
        (2, 37, 37, 4, 2, False, None),  # a prefill, grouped-query heads
        (2, 37, 37, 4, 4, True, None),  # padding, one query head per KV head
        (2, 13, 50, 6, 2, True, None),  # a chunk over a padded past
        (2, 1, 30, 4, 2, True, 5.0),  # the decode step, capped
        (1, 20, 45, 4, 1, False, 2.5),  # a capped chunk over a past
    ],
)
def test_fp32_matches_reference(B, T, L, H, HKV, padded, softcap):
    errors = compare(B, T, L, H, HKV, 24, padded=padded, softcap=softcap, seed=T + L)
    assert_below(errors, BOUND.forward, BOUND.gradients)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_packed_sequences_never_attend_across(softcap):
    cu = torch.tensor([0, 1, 1, 20, 27, 60])  # a length-1 and an empty sequence
    errors = compare(1, 60, 60, 4, 2, 16, cu_seqlens=cu, softcap=softcap)
    assert_below(errors, BOUND.forward, BOUND.gradients)


def test_fp64_is_exact():
    errors = compare(2, 9, 33, 4, 2, 12, dtype=F64, padded=True, scale=0.3)
    assert_below(errors, 1e-12, 1e-12)
