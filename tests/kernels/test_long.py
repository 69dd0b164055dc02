"""chunk_gla over 32k tokens with strong decay: finite in fp32 and equal to its own fp64 run."""
import pytest
import torch

from linearize.kernels.gla.torch_chunk import chunk_gla
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

T = 32768


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scalar", [False, True], ids=["per-channel", "scalar"])
def test_32k_tokens_strong_decay(scalar):
    gen = torch.Generator().manual_seed(0)
    B, H, HKV, K, V = 1, 2, 1, 16, 16
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, HKV, K, generator=gen) / K**0.5
    v = torch.randn(B, T, HKV, V, generator=gen)
    shape_g = (B, T, HKV) if scalar else (B, T, HKV, K)
    # mostly strong decay (-5..-20 per token), some channels nearly without decay
    g = -(5 + 15 * torch.rand(shape_g, generator=gen))
    g = torch.where(torch.rand(shape_g, generator=gen) < 0.2, g * 1e-3, g)
    h0 = torch.randn(B, HKV, K, V, generator=gen)

    def run(dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, g, h0)]
        o, s = chunk_gla(*x[:4], scale=K**-0.5, initial_state=x[4], output_final_state=True)
        (o.sum() + s.sum()).backward()
        return [o, s] + [t.grad for t in x]

    got = run(torch.float32)
    want = run(torch.float64)
    names = ["o", "state", "dq", "dk", "dv", "dg", "dh0"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-5, (name, rel(a, b))
