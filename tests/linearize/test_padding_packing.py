"""Padding and packing are invisible: compared with the same sequences run alone, unpadded.

Unlike the cache tests (padded prefill + decode against a padded full forward, i.e. our code
against itself), these compare against an independent ground truth: the sequence run by
itself with nothing around it. A padded token that leaks into the recurrent state, the
window, a sink slot or a gate, or a packed document that sees its neighbour, changes the
result. Models are tiny random GQA Llamas whose new parameters are `perturb`ed, so heads,
tokens and gates all differ; pad tokens are random ids, not a quiet pad id.
"""
from __future__ import annotations

import pytest
import torch

import linearize
from helpers.perturb import perturb
from linearize import LinearizeCache

WINDOW = 6
CASES = {
    "liger-gla": dict(method="liger-gla", window=WINDOW),
    "liger-hgrn2": dict(method="liger-hgrn2", window=WINDOW),
    "lizard": dict(method="lizard", window=WINDOW),
    "lolcats": dict(method="lolcats", window=WINDOW),
    # the shipped conversion without LoLA: feature maps before RoPE, so decoding undoes the
    # rotation of each key that leaves the cached window
    "lolcats-norope-gate-sinks": dict(method="lolcats", window=WINDOW, init="baseline", gate="mamba2", linear_rope=False, num_sink_tokens=2),
    "window-sinks": dict(method="window-sinks", window=WINDOW),
    "liger-gla-recurrent": dict(method="liger-gla", window=0, gate="mamba2"),
    "lizard-recurrent": dict(method="lizard", window=0),
    "gated-deltanet": dict(method="gated-deltanet", window=WINDOW),
    "gated-deltanet-recurrent": dict(method="gated-deltanet", window=0),
}
TOL = 1e-5  # fp32 throughout; the two sides differ only in summation order


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def converted(make_tiny_model, case, seed=0):
    model = make_tiny_model("llama", num_hidden_layers=2, initializer_range=0.1)
    linearize.convert(model, **CASES[case])
    return perturb(model, seed)


def alone(model, ids):
    """Logits of one unpadded sequence [T] run by itself."""
    with torch.no_grad():
        return model(ids[None], position_ids=torch.arange(len(ids))[None], use_cache=False).logits[0]


# --- padding -------------------------------------------------------------------------------------------

PADS = (0, 4, 11)  # row 2's padding is longer than the prefill: its whole prefill chunk is padding
T, PREFILL = 22, 9


def left_padded_batch(gen):
    """Sequences of length T - pad, left-padded with random (not pad-id) tokens to T."""
    ids = torch.randint(1, 128, (len(PADS), T), generator=gen)
    mask = torch.ones(len(PADS), T, dtype=torch.long)
    for row, p in enumerate(PADS):
        mask[row, :p] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("case", list(CASES))
def test_left_padding_is_invisible_prefill_and_decode(make_tiny_model, case):
    """A left-padded row's logits at its real positions equal the sequence's own unpadded run,
    for a full padded forward and for padded prefill followed by one-token decode steps
    (LinearizeCache). Guards: padding masked out of the linear state (k, v and the gate),
    out of the window and the sink tokens, and the decode-time mask slicing. Not observable here,
    so not guarded: the gate at padded positions (log a = 0 there). Left padding precedes every
    real token, so a pad's decay only ever acts on an empty state (forward and gradient)."""
    model = converted(make_tiny_model, case)
    ids, mask, pos = left_padded_batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        steps = [model(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], position_ids=pos[:, :PREFILL],
                       cache=cache, use_cache=True).logits]
        for t in range(PREFILL, T):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               cache=cache, use_cache=True).logits)
    decoded = torch.cat(steps, dim=1)
    for row, p in enumerate(PADS):
        ref = alone(model, ids[row, p:])
        assert rel(full[row, p:], ref) < TOL, f"row {row} (pad {p}) full forward: {rel(full[row, p:], ref):.1e}"
        assert rel(decoded[row, p:], ref) < TOL, f"row {row} (pad {p}) decode: {rel(decoded[row, p:], ref):.1e}"


# --- packing -------------------------------------------------------------------------------------------

DOC_LENGTHS = (9, 1, 14, 6)  # longer than the window, a one-token document, the last one short


def run_with_grads(model, embeds, positions, weight, params):
    """Logits of one row of input embeddings, and the gradients of sum(logits * weight)
    with respect to the embeddings and to `params`."""
    embeds = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False).logits[0]
    grads = torch.autograd.grad((logits * weight).sum(), [embeds, *params], allow_unused=True)
    return logits.detach(), grads[0], grads[1:]


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_row_equals_documents_run_one_by_one(make_tiny_model, case, teacher):
    """One packed row (position_ids restarting at 0 per document, no attention mask, as
    distillation packs) equals each document run alone: logits, gradients of the input
    embeddings, and gradients of the new parameters (student) or of q/k/v/o of layer 0
    (teacher) summed over documents. Guards the sequence bounds taken from position_ids
    (recurrent state reset, window and sink tokens per document) and the teacher's own
    packed mask."""
    model = converted(make_tiny_model, case)
    gen = torch.Generator().manual_seed(7)
    total = sum(DOC_LENGTHS)
    embeds = torch.randn(total, model.config.hidden_size, generator=gen)
    weight = torch.randn(total, model.config.vocab_size, generator=gen)
    positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS])
    if teacher:
        attn = model.model.layers[0].self_attn
        params = [getattr(attn, f"{n}_proj").weight for n in "qkvo"]
    else:
        params = [p for _, p in linearize.new_parameters(model)]
    context = linearize.teacher(model) if teacher else torch.enable_grad()
    with context:
        packed, d_embeds, d_params = run_with_grads(model, embeds, positions, weight, params)
        start, d_params_docs = 0, [None] * len(params)
        for n in DOC_LENGTHS:
            sl = slice(start, start + n)
            logits, d_emb, d_par = run_with_grads(model, embeds[sl], positions[sl], weight[sl], params)
            assert rel(packed[sl], logits) < TOL, f"document at {start}: logits {rel(packed[sl], logits):.1e}"
            assert rel(d_embeds[sl], d_emb) < TOL, f"document at {start}: d embeds {rel(d_embeds[sl], d_emb):.1e}"
            d_params_docs = [a if b is None else (b if a is None else a + b) for a, b in zip(d_params_docs, d_par)]
            start += n
        # the comparison can fail: the same row read as one long sequence differs at the last document
        with torch.no_grad():
            unpacked = model(inputs_embeds=embeds[None], position_ids=torch.arange(total)[None]).logits[0]
        assert rel(unpacked[-DOC_LENGTHS[-1]:], logits) > 1e-3
    for p, got, want in zip(params, d_params, d_params_docs):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel(got, want) < TOL, f"d param {tuple(p.shape)}: {rel(got, want):.1e}"
