"""Decoding several tokens per call: a left-padded prefill, then chunks of 2, 3, 4 (and 5)
tokens against the cached window and state, equal the full forward and each row run alone.

Chunks of up to `DECODE_STEP_TOKENS` (4) take the step-by-step recurrence and the cached
window's softmax over the sinks, the window and the chunk's own earlier tokens; a chunk of 5
takes the chunked kernels with a carried state. Each chunk's later queries must see its
earlier keys (causally, inside the window) and nothing after them; a padded row's chunk may
be all padding. Models are `perturb`ed (gates, maps, sinks and weights distinct per head and
token) and pad tokens are random ids.
"""
from __future__ import annotations

import pytest
import torch

import linearize
from helpers.perturb import perturb
from helpers.threads import one_thread  # noqa: F401
from linearize import LinearizeCache

WINDOW = 6
CASES = {
    "liger-gla": dict(method="liger-gla", window=WINDOW),
    "liger-hgrn2": dict(method="liger-hgrn2", window=WINDOW),
    "lizard": dict(method="lizard", window=WINDOW),
    "lizard-mamba2-sinks": dict(method="lizard", window=WINDOW, gate="mamba2", num_sink_tokens=2),
    "lolcats": dict(method="lolcats", window=WINDOW),
    "lolcats-sinks-gate-baseline": dict(method="lolcats", window=WINDOW, num_sink_tokens=2, gate="scalar",
                                        init="baseline"),
    # the shipped conversion without LoLA: feature maps before RoPE, so decoding undoes the
    # rotation of each key that leaves the cached window
    "lolcats-norope-gate-sinks": dict(method="lolcats", window=WINDOW, init="baseline", gate="mamba2", linear_rope=False, num_sink_tokens=2),
    "lolcats-sparse-cache": dict(method="lolcats", window=4, num_sink_tokens=1, sparse_cache=3, sparse_block=4),
    # the shipped default: LoLA over feature maps before RoPE (its state keeps the recent keys'
    # rotation, not the keys)
    "lolcats-sparse-cache-norope": dict(method="lolcats", window=4, num_sink_tokens=1, sparse_cache=3, sparse_block=4,
                                        linear_rope=False, gate="mamba2", init="baseline"),
    "window-sinks": dict(method="window-sinks", window=WINDOW, num_sink_tokens=2),
    "gated-deltanet": dict(method="gated-deltanet", window=WINDOW),
    "gated-deltanet-recurrent": dict(method="gated-deltanet", window=0, share_state_across_group=False),
    "liger-gla-recurrent": dict(method="liger-gla", window=0, gate="mamba2"),
    "hybrid-lizard": dict(method="lizard", window=WINDOW, softmax_layers=[1]),
}
PADS = (0, 4, 13)  # row 2: the prefill and the first chunk are all padding
PREFILL = 9
CHUNKS = (2, 3, 4, 2, 3, 4, 5)
T = PREFILL + sum(CHUNKS)
TOL = 1e-5  # fp32 on both sides; they differ in summation order only


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_decode_equals_full_forward_and_each_row_alone(make_tiny_model, case):
    model = make_tiny_model("llama", num_hidden_layers=2, initializer_range=0.1)
    linearize.convert(model, **CASES[case])
    perturb(model, seed=11)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 128, (len(PADS), T), generator=gen)
    mask = torch.ones(len(PADS), T, dtype=torch.long)
    for row, p in enumerate(PADS):
        mask[row, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    bounds = [0, PREFILL]
    for n in CHUNKS:
        bounds.append(bounds[-1] + n)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        pieces = [model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache).logits
                  for a, b in zip(bounds, bounds[1:])]
        alone = [model(ids[row, p:][None], use_cache=False).logits[0] for row, p in enumerate(PADS)]
    chunked = torch.cat(pieces, dim=1)
    for row, p in enumerate(PADS):
        for a, b in zip(bounds[1:], bounds[2:]):  # every decode chunk, on its real tokens
            lo = max(a, p)
            if lo >= b:
                continue
            err_full, err_alone = rel(chunked[row, lo:b], full[row, lo:b]), rel(chunked[row, lo:b], alone[row][lo - p:b - p])
            assert err_full < TOL, f"row {row}, chunk [{a}, {b}) vs the padded full forward: {err_full:.1e}"
            assert err_alone < TOL, f"row {row}, chunk [{a}, {b}) vs the row alone: {err_alone:.1e}"
    assert cache.get_seq_length() == T
