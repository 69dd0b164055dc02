"""The fused recurrent Triton gated delta rule (decoding) against the fp64 reference.

Runs in the Triton interpreter on the CPU (TRITON_INTERPRET=1, set before any kernel module
is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from linearize.kernels.delta.triton_recurrent import fused_recurrent_gated_delta_rule  # noqa: E402
from linearize.kernels.delta.naive import naive_gated_delta_rule  # noqa: E402


def rel(a, b) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().norm()).item()


def inputs(B, T, H, HKV, K, V, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, HKV, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HKV, V, generator=gen)
    beta = torch.sigmoid(torch.randn(B, T, HKV, generator=gen))
    g = F.logsigmoid(torch.randn(B, T, HKV, generator=gen) + 2)
    h0 = torch.randn(N or B, HKV, K, V, generator=gen)
    return q, k, v, beta, g, h0


@pytest.mark.parametrize("shape", [(2, 5, 4, 2, 16, 16), (1, 3, 2, 2, 20, 40)])
def test_fused_recurrent_matches_reference(shape):
    """GQA, K and V not powers of two (V over one value block when interpreting), initial and final state."""
    q, k, v, beta, g, h0 = inputs(*shape)
    ref, s_ref = naive_gated_delta_rule(*(x.double() for x in (q, k, v, beta, g)), scale=0.5,
                                        initial_state=h0.double(), output_final_state=True)
    o, s = fused_recurrent_gated_delta_rule(*(x.to(DEVICE) for x in (q, k, v, beta, g)), scale=0.5,
                                            initial_state=h0.to(DEVICE), output_final_state=True)
    assert rel(o, ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_fused_recurrent_packed_sequences_and_grad_refusal():
    q, k, v, beta, g, h0 = inputs(1, 7, 2, 1, 16, 16, N=2)
    cu = torch.tensor([0, 3, 7])
    ref, s_ref = naive_gated_delta_rule(*(x.double() for x in (q, k, v, beta, g)), initial_state=h0.double(),
                                        output_final_state=True, cu_seqlens=cu)
    o, s = fused_recurrent_gated_delta_rule(*(x.to(DEVICE) for x in (q, k, v, beta, g)), initial_state=h0.to(DEVICE),
                                            output_final_state=True, cu_seqlens=cu.to(DEVICE))
    assert rel(o, ref) < 1e-5 and rel(s, s_ref) < 1e-5
    with pytest.raises(RuntimeError, match="forward only"):
        fused_recurrent_gated_delta_rule(q.to(DEVICE).requires_grad_(), k.to(DEVICE), v.to(DEVICE),
                                         beta.to(DEVICE), g.to(DEVICE))


def test_dispatcher_decodes_with_the_fused_kernel_under_the_triton_backend():
    from linearize.kernels import recurrent_gated_delta_rule

    q, k, v, beta, g, h0 = (x.to(DEVICE) for x in inputs(2, 2, 4, 2, 16, 16))
    with torch.no_grad():
        o, s = recurrent_gated_delta_rule(q, k, v, beta, g, scale=1.0, initial_state=h0, output_final_state=True,
                                          backend="triton")
    ref, s_ref = recurrent_gated_delta_rule(q, k, v, beta, g, scale=1.0, initial_state=h0, output_final_state=True,
                                            backend="torch")
    assert rel(o, ref) < 1e-6 and rel(s, s_ref) < 1e-6
