"""`generate` paths users rely on beyond greedy decoding of one prompt: beam search over a
left-padded batch, a PEFT-wrapped student, and the Triton kernels with the decode cache.

Models are tiny random Llamas whose new parameters are `perturb`ed (per head and token)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import linearize
from helpers.perturb import perturb
from helpers.threads import one_thread  # noqa: F401
from linearize import LinearizeCache

WINDOW = 5


def student(make_tiny_model, seed=0, **fields):
    model = make_tiny_model("llama", num_hidden_layers=2, initializer_range=0.1)
    linearize.convert(model, **fields)
    return perturb(model, seed)


def left_padded(pads, T, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(pads), T), generator=gen)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids, mask


# --- beam search with left padding ------------------------------------------------------------------

BEAM_CASES = {
    "liger-gla": dict(method="liger-gla", window=WINDOW),
    "lizard": dict(method="lizard", window=WINDOW, num_sink_tokens=2),
    "lolcats": dict(method="lolcats", window=WINDOW),
    # the shipped conversion without LoLA: feature maps before RoPE, so decoding undoes the
    # rotation of each key that leaves the cached window
    "lolcats-norope-gate-sinks": dict(method="lolcats", window=WINDOW, init="baseline", gate="mamba2", linear_rope=False, num_sink_tokens=2),
    "gated-deltanet": dict(method="gated-deltanet", window=WINDOW),
    "window-sinks": dict(method="window-sinks", window=WINDOW, num_sink_tokens=2),
    "hybrid-liger-gla-recurrent": dict(method="liger-gla", window=0, gate="mamba2", softmax_layers=[1]),
}


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_on_a_left_padded_batch_equals_each_row_alone(make_tiny_model, case):
    """num_beams=3 over rows padded by 0, 3 and 7 tokens returns, for each row, the sequence
    that row's prompt returns alone, and what the batch returns without a cache (every step
    recomputed): the cache's reorder (beam_idx) and repeat_interleave carry the state and the
    padding with each beam, and no beam of one row sees another row. No EOS, so
    every hypothesis has the same length and the length penalty cannot reorder them."""
    model = student(make_tiny_model, **BEAM_CASES[case])
    pads = (0, 3, 7)
    ids, mask = left_padded(pads, 14, seed=1)
    kw = dict(max_new_tokens=7, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(batch, model.generate(ids, attention_mask=mask, use_cache=False, **kw))
        for row, p in enumerate(pads):
            alone = model.generate(ids[row:row + 1, p:], **kw)
            assert torch.equal(batch[row, p:], alone[0]), f"row {row} (pad {p}): {batch[row, p:]} vs {alone[0]}"


# --- generate on a PEFT-wrapped student ------------------------------------------------------------

@pytest.mark.parametrize("case", ["lolcats", "gated-deltanet"])
def test_generate_on_a_peft_student_equals_the_merged_model(make_tiny_model, case):
    """LoRA on q_proj/v_proj (B given random values: peft starts it at zero, a no-op): the
    PeftModel's greedy generate over a left-padded batch runs with the LinearizeCache and
    returns the merged model's tokens; the adapter changes them (so the comparison can fail)."""
    from peft import LoraConfig, get_peft_model

    model = student(make_tiny_model, **BEAM_CASES[case])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.eval()
    ids, mask = left_padded((0, 4), 11, seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, return_dict_in_generate=True, **kw)
        with peft_model.disable_adapter():
            without = peft_model.generate(input_ids=ids, **kw)
        merged = peft_model.merge_and_unload()
        ref = merged.generate(input_ids=ids, **kw)
    assert isinstance(out.past_key_values, LinearizeCache)
    assert torch.equal(out.sequences, ref)
    assert not torch.equal(without, ref)


# --- Triton kernels with the decode cache ------------------------------------------------------------

TRITON_CASES = {
    "liger-gla": dict(method="liger-gla", window=WINDOW),  # fused hybrid prefill, fused recurrent steps
    "lizard-mamba2-sinks": dict(method="lizard", window=WINDOW, gate="mamba2", num_sink_tokens=2),
    "gated-deltanet": dict(method="gated-deltanet", window=WINDOW),  # fused delta-rule steps
}
# The interpreter runs the Triton kernels in fp32 numpy: measured 5e-7 against the torch backend.
# On a GPU tl.dot may round through TF32: the kernels' own bound against fp64 (kernels/tolerances.py).
INTERPRET_TOL = 1e-5


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_prefill_and_decode_match_the_torch_backend(make_tiny_model, monkeypatch, case):
    """A left-padded prefill on the Triton backend (final state from the Triton kernels), then
    decode steps of 1, 2 and 1 tokens: all on Triton, and a Triton prefill continued on the
    torch backend, equal the torch backend throughout (logits and the cache's state), so the
    Triton kernels hand the cache a state in the layout the decode steps read."""
    pytest.importorskip("triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it) or a CUDA device")
    device = "cpu" if interpret else "cuda"
    from linearize.kernels.tolerances import tolerance

    tol = INTERPRET_TOL if interpret else 2 * tolerance("hybrid", "triton", torch.float32).forward
    model = student(make_tiny_model, **TRITON_CASES[case]).to(device)
    ids, mask = left_padded((0, 3), 17, seed=3)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    bounds = (0, 13, 14, 16, 17)

    def run(prefill_backend, decode_backend):
        cache = LinearizeCache(model)
        out = []
        for a, b in zip(bounds, bounds[1:]):
            monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", prefill_backend if a == 0 else decode_backend)
            with torch.no_grad():
                out.append(model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                                 cache=cache).logits)
        return torch.cat(out, 1)[mask.bool()], cache.layers[0]

    ref, ref_state = run("torch", "torch")
    for prefill, decode in (("triton", "triton"), ("triton", "torch")):
        got, state = run(prefill, decode)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < tol, f"{prefill} prefill, {decode} decode: logits {err:.1e}"
        if ref_state.recurrent is not None:
            s_err = ((state.recurrent - ref_state.recurrent).norm() / ref_state.recurrent.norm()).item()
            assert s_err < tol, f"{prefill} prefill, {decode} decode: state {s_err:.1e}"
