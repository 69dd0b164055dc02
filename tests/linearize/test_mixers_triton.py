"""The mixers on the Triton path (run by the interpreter on the CPU) equal the CPU path."""
import pytest
import torch

import linearize

pytest.importorskip("triton")


@pytest.mark.parametrize("fields", [
    dict(method="liger-gla"),            # fused hybrid kernel, mix mode
    dict(method="lolcats"),              # fused hybrid kernel, shared denominator
    dict(method="lizard", gate="mamba2"),  # separate window (sink logits) and GLA kernels
    dict(method="window-sinks"),
], ids=lambda f: f["method"])
def test_triton_backend_matches_torch_backend(make_tiny_model, monkeypatch, fields):
    model = linearize.convert(make_tiny_model("llama"), window=5, **fields)
    ids = torch.randint(0, 128, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0
    monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "torch")
    ref = model(ids, attention_mask=mask, use_cache=False).logits
    ref.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "triton")
    out = model(ids, attention_mask=mask, use_cache=False).logits
    out.float().pow(2).mean().backward()
    valid = mask.bool()
    assert ((out - ref)[valid].norm() / ref[valid].norm()) < 1e-4
    for name, g in ref_grads.items():
        got = dict(model.named_parameters())[name].grad
        assert ((got - g).norm() / g.norm().clamp_min(1e-12)) < 1e-3, name
