"""init='baseline': an untrained converted model computes exactly the window + sinks baseline
(same window, same sinks), and training can move it away from there."""
import pytest
import torch

import linearize


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["liger-gla", "liger-hgrn2", "lizard", "lolcats", "gated-deltanet"])
def test_untrained_equals_window_sinks(make_tiny_model, method):
    base = make_tiny_model("llama")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 128, (2, 41))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    linearize.convert(base, method="window-sinks", window=8, num_sink_tokens=3)
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
    linearize.unconvert(base)
    base.load_state_dict(state)
    linearize.convert(base, method=method, window=8, num_sink_tokens=3, init="baseline")
    with torch.no_grad():
        got = base(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(got[real], want[real]) < 1e-6


@pytest.mark.parametrize("method", ["liger-gla", "lizard", "lolcats", "gated-deltanet"])
def test_baseline_linear_weight_gets_a_gradient(make_tiny_model, method):
    """The linear branch starts at weight 0 but is not stuck there: the loss has a gradient
    with respect to its per-head weight, so training can turn the recurrence on."""
    model = make_tiny_model("llama")
    linearize.convert(model, method=method, window=4, init="baseline")
    ids = torch.randint(0, 128, (1, 30))
    model(ids, labels=ids).loss.backward()
    mixer = model.model.layers[0].self_attn
    weight = mixer.linearize_linear_factor if method == "lolcats" else mixer.linearize_linear_weight
    assert torch.count_nonzero(weight) == 0
    assert weight.grad is not None and weight.grad.abs().sum() > 0
