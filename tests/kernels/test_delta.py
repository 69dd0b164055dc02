"""The gated delta rule: chunked (WY form) and decode paths against the fp64 token loop."""
import pytest
import torch
import torch.nn.functional as F

from linearize.kernels import gated_delta_rule, recurrent_gated_delta_rule
from linearize.kernels.delta.torch_chunk import chunk_gated_delta_rule
from linearize.kernels.delta.naive import naive_gated_delta_rule
from linearize.kernels.delta.torch_recurrent import recurrent_gated_delta_rule as recurrent_step
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

F64 = torch.float64
TOL = 1e-5  # fp32 vs the fp64 reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64; NaN or inf never passes."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HKV, K, V, *, gate="mixed", N=None, seed=0):
    """q, k (L2-normalised), v, beta = sigmoid(.), g log decay by strength, h0 [N, HKV, K, V]; fp32."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, T, HKV, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, HKV, V, generator=gen, dtype=F64)
    beta = torch.sigmoid(2 * torch.randn(B, T, HKV, generator=gen, dtype=F64))
    if gate == "zero":
        g = torch.zeros(B, T, HKV, dtype=F64)
    elif gate == "strong":
        g = -(2 + 10 * torch.rand(B, T, HKV, generator=gen, dtype=F64))
    else:
        g = F.logsigmoid(2 * torch.randn(B, T, HKV, generator=gen, dtype=F64) + 3)
    h0 = torch.randn(N or B, HKV, K, V, generator=gen, dtype=F64)
    return [x.float() for x in (q, k, v, beta, g, h0)]


NAMES = ["dq", "dk", "dv", "dbeta", "dg", "dh0"]


def compare(inputs, *, fn=chunk_gated_delta_rule, scale=None, cu_seqlens=None, with_state=True, **kw):
    """Relative errors of fn vs the fp64 reference on the same rounded inputs: output, final
    state and the gradient of every input (a random linear loss on both outputs)."""
    *xs, h0 = inputs
    h0 = h0 if with_state else None
    ref = [x.detach().to(F64).requires_grad_() for x in xs + ([h0] if with_state else [])]
    o_ref, s_ref = naive_gated_delta_rule(*ref[:5], scale=scale, initial_state=ref[5] if with_state else None,
                                          output_final_state=True, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o_ref.shape, generator=gen, dtype=F64), torch.randn(s_ref.shape, generator=gen, dtype=F64)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref)
    mine = [x.detach().requires_grad_() for x in xs] + ([h0.detach().requires_grad_()] if with_state else [])
    extra = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    o, s = fn(*mine[:5], scale=scale, initial_state=mine[5] if with_state else None, output_final_state=True,
              **extra, **kw)
    assert o.dtype == torch.float32 and o.shape == o_ref.shape and s.dtype == torch.float32 and s.shape == s_ref.shape
    grads = torch.autograd.grad((o * do.float()).sum() + (s * ds.float()).sum(), mine)
    errs = {"o": rel(o, o_ref), "state": rel(s, s_ref)}
    errs.update({n: rel(a, b) for n, a, b in zip(NAMES, grads, grads_ref)})
    return errs


def assert_small(errs, tol=TOL):
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"


@pytest.mark.parametrize("T", [1, 37, 64, 100, 129])
@pytest.mark.parametrize("gate", ["mixed", "zero", "strong"])
def test_chunk_matches_reference_with_gradients(T, gate):
    """T below, at and across chunk boundaries (chunks of 32 on the CPU); GQA (4 query heads on
    2 KV heads); K != V, not powers of two; initial and final state; gradients of q, k, v, beta,
    g, h0."""
    assert_small(compare(make_inputs(2, T, 4, 2, 12, 10, gate=gate)))


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_any_chunk_size_is_exact(chunk_size):
    assert_small(compare(make_inputs(1, 45, 2, 1, 8, 8), chunk_size=chunk_size, scale=0.7))


def test_without_initial_state_and_mha():
    assert_small(compare(make_inputs(2, 70, 3, 3, 16, 16), with_state=False))


def test_varlen_matches_reference_and_separate_sequences():
    """Packed sequences (one of length 1, one longer than a chunk) equal the reference and each
    sequence run alone from its own initial state."""
    lens = [5, 1, 80, 30]
    cu = torch.tensor([0, 5, 6, 86, 116])
    inputs = make_inputs(1, 116, 4, 2, 8, 6, N=len(lens), seed=3)
    assert_small(compare(inputs, cu_seqlens=cu))
    q, k, v, beta, g, h0 = inputs
    o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        on, sn = chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b],
                                        initial_state=h0[n:n + 1], output_final_state=True)
        assert rel(o[:, a:b], on) < 1e-6 and rel(s[n:n + 1], sn) < 1e-6


def test_long_inputs_in_segments_carry_the_state(monkeypatch):
    """Segments of whole chunks (forced small here) give the same outputs, state and gradients,
    padded batches and packed sequences alike, with and without autograd."""
    import linearize.kernels.delta.torch_chunk as chunk

    monkeypatch.setattr(chunk, "_SEGMENT_ELEMENTS", 1)  # one chunk per segment
    assert_small(compare(make_inputs(2, 150, 4, 2, 8, 6), chunk_size=16))
    assert_small(compare(make_inputs(1, 70, 2, 1, 8, 6, N=2), cu_seqlens=torch.tensor([0, 33, 70]), chunk_size=16))
    q, k, v, beta, g, h0 = make_inputs(2, 150, 4, 2, 8, 6)  # without autograd: segments copied into one buffer
    o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, chunk_size=16)
    ref, s_ref = naive_gated_delta_rule(*(x.to(F64) for x in (q, k, v, beta, g)), initial_state=h0.to(F64),
                                        output_final_state=True)
    assert_small({"o": rel(o, ref), "state": rel(s, s_ref)})


@pytest.mark.parametrize("T", [1, 37, 129])
@pytest.mark.parametrize("gate", ["mixed", "strong"])
def test_without_autograd_matches_reference_and_leaves_the_state_alone(T, gate):
    """Without autograd the loop over chunks updates its state in place: it equals the fp64
    reference and the recorded path, and the caller's initial state is untouched."""
    q, k, v, beta, g, h0 = make_inputs(2, T, 4, 2, 12, 10, gate=gate)
    kept = h0.clone()
    with torch.no_grad():
        o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    ref, s_ref = naive_gated_delta_rule(*(x.to(F64) for x in (q, k, v, beta, g)), initial_state=h0.to(F64),
                                        output_final_state=True)
    assert_small({"o": rel(o, ref), "state": rel(s, s_ref)})
    assert torch.equal(h0, kept)
    o_rec, s_rec = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0.requires_grad_(), output_final_state=True)
    assert torch.allclose(o, o_rec, rtol=0, atol=1e-6) and torch.allclose(s, s_rec, rtol=0, atol=1e-6)


def test_recurrent_step_matches_reference_with_gradients():
    assert_small(compare(make_inputs(2, 9, 4, 2, 8, 6), fn=recurrent_step))


def test_step_by_step_decode_equals_full_forward():
    """A chunked prefill followed by one-token recurrent steps carrying the state equals one
    chunked forward over everything (outputs and final state)."""
    q, k, v, beta, g, h0 = make_inputs(2, 90, 4, 2, 16, 16, seed=7)
    full, s_full = gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, backend="torch")
    P = 70
    outs, state = [], None
    o, state = gated_delta_rule(q[:, :P], k[:, :P], v[:, :P], beta[:, :P], g[:, :P], initial_state=h0,
                                output_final_state=True, backend="torch")
    outs.append(o)
    for t in range(P, 90):
        sl = slice(t, t + 1)
        o, state = recurrent_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl],
                                              initial_state=state, output_final_state=True, backend="torch")
        outs.append(o)
    assert rel(torch.cat(outs, 1), full) < 1e-6 and rel(state, s_full) < 1e-6


def test_dispatcher_backends_agree_and_reject_unknown():
    q, k, v, beta, g, h0 = make_inputs(1, 20, 2, 2, 8, 8)
    a, sa = gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, backend="naive")
    b, sb = gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, backend="torch")
    assert rel(b, a) < TOL and rel(sb, sa) < TOL
    with pytest.raises(ValueError, match="unknown backend"):
        gated_delta_rule(q, k, v, beta, g, backend="cuda")


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v, beta, g, h0 = make_inputs(1, 80, 2, 1, 16, 16)
    o, s = chunk_gated_delta_rule(*(x.bfloat16() for x in (q, k, v)), beta, g, initial_state=h0,
                                  output_final_state=True)
    ref, s_ref = naive_gated_delta_rule(*(x.bfloat16().double() for x in (q, k, v)), beta.double(), g.double(),
                                        initial_state=h0.double(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(o, ref) < 1e-2 and rel(s, s_ref) < 1e-4


@pytest.mark.parametrize("bad", [dict(beta=(2, 10, 4)), dict(g=(2, 10, 2, 8)), dict(h0=(3, 2, 8, 8))])
def test_bad_shapes_are_refused(bad):
    q, k, v, beta, g, h0 = make_inputs(2, 10, 4, 2, 8, 8)
    beta = torch.rand(bad["beta"]) if "beta" in bad else beta
    g = -torch.rand(bad["g"]) if "g" in bad else g
    h0 = torch.randn(bad["h0"]) if "h0" in bad else h0
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0)
