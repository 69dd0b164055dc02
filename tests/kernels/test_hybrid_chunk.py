"""The CPU hybrid (chunked window + chunked GLA) against the fp64 naive hybrid."""
import pytest
import torch

from linearize.kernels import hybrid_attention
from linearize.kernels.tolerances import tolerance

BOUND = tolerance("hybrid", "torch", "float32")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["mix", "shared"])
@pytest.mark.parametrize("scalar_gate", [False, True])
def test_chunked_hybrid_matches_naive(mode, scalar_gate):
    B, T, H, HKV, D, K = 2, 37, 4, 2, 12, 10
    g64 = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=g64, dtype=torch.float64)
    q, k, v = t(B, T, H, D), t(B, T, HKV, D), t(B, T, HKV, D)
    fq, fk = t(B, T, H, K).softmax(-1), t(B, T, HKV, K).softmax(-1)
    g = -torch.rand(*((B, T, HKV) if scalar_gate else (B, T, HKV, K)), generator=g64, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :6] = False
    extra = dict(w_win=torch.rand(H, generator=g64, dtype=torch.float64), w_lin=0.5) if mode == "mix" else \
        dict(c=torch.rand(H, generator=g64, dtype=torch.float64))
    sink = t(H, 2)
    inputs = [x.float().requires_grad_() for x in (q, k, v, fq, fk, g)]
    out, state = hybrid_attention(*inputs, window=7, mode=mode, num_sink_tokens=1, sink_logits=sink.float(),
                                  key_mask=mask, output_final_state=True, backend="torch", **{
                                      n: (x.float() if torch.is_tensor(x) else x) for n, x in extra.items()})
    refs = [x.clone().requires_grad_() for x in (q, k, v, fq, fk, g)]
    ref, ref_state = hybrid_attention(*refs, window=7, mode=mode, num_sink_tokens=1, sink_logits=sink,
                                      key_mask=mask, output_final_state=True, backend="naive", **extra)
    valid = mask
    assert rel(out.double()[valid], ref[valid]) < BOUND.forward
    assert rel(state.double(), ref_state) < BOUND.forward
    w = t(*ref.shape) * valid[..., None, None]
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in zip(inputs, refs):
        assert torch.isfinite(got.grad).all()
        assert rel(got.grad.double(), want.grad) < BOUND.gradients
