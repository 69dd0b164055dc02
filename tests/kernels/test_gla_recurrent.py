"""recurrent_gla (the CPU decode path) against the fp64 loop reference naive_gla, and the
dispatcher that picks it for a few tokens against a carried state."""
import pytest
import torch

from linearize.kernels import ENV_VAR, recurrent_gated_linear_attention
from linearize.kernels.gla.naive import naive_gla
from linearize.kernels.gla.torch_recurrent import recurrent_gla

from test_gla import F64, make_inputs, rel  # the same random inputs and error measure


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("with_state", [True, False])
def test_matches_reference(scalar, T, with_state):
    q, k, v, g, h0 = make_inputs(2, T, 6, 2, 12, 10, scalar=scalar)
    h0 = h0 if with_state else None
    o_ref, s_ref = naive_gla(*(x.to(F64) for x in (q, k, v, g)), scale=0.3,
                             initial_state=None if h0 is None else h0.to(F64), output_final_state=True)
    o, s = recurrent_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert o.dtype == q.dtype and s.dtype == torch.float32 and o.shape == o_ref.shape
    assert rel(o, o_ref) < 2e-6 and rel(s, s_ref) < 2e-6
    o64, s64 = recurrent_gla(*(x.to(F64) for x in (q, k, v, g)), scale=0.3,
                             initial_state=None if h0 is None else h0.to(F64), output_final_state=True)
    assert rel(o64, o_ref) < 1e-12 and rel(s64, s_ref) < 1e-12


def test_gradients_match_reference():
    q, k, v, g, h0 = make_inputs(1, 2, 4, 2, 8, 8)
    leaves = [x.to(F64).requires_grad_() for x in (q, k, v, g, h0)]
    o, s = recurrent_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    o_ref, s_ref = naive_gla(*ref_leaves[:4], initial_state=ref_leaves[4], output_final_state=True)
    for a, b in zip(grads, torch.autograd.grad(o_ref.sum() + s_ref.sum(), ref_leaves)):
        assert rel(a, b) < 1e-12


def test_bf16_inputs_and_bad_shapes():
    q, k, v, g, h0 = make_inputs(1, 1, 4, 2, 8, 8, dtype=torch.bfloat16)
    o, s = recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, _ = naive_gla(*(x.to(F64) for x in (q, k, v, g)), initial_state=h0.to(F64))
    assert o.dtype == torch.bfloat16 and rel(o, o_ref) < 2e-2
    with pytest.raises(ValueError, match="initial_state"):
        recurrent_gla(q, k, v, g, initial_state=h0[:, :1])


@pytest.mark.parametrize("forced, expect", [(None, recurrent_gla), ("naive", naive_gla)])
def test_dispatcher_on_cpu(monkeypatch, forced, expect):
    monkeypatch.delenv(ENV_VAR, raising=False)
    q, k, v, g, h0 = make_inputs(1, 2, 4, 2, 8, 8)
    o, s = recurrent_gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend=forced)
    o_ref, s_ref = expect(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
