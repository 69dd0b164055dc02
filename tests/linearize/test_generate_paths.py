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
    "gated-deltanet": dict(method="gated-deltanet", window=WINDOW),
    "window-sinks": dict(method="window-sinks", window=WINDOW, num_sink_tokens=2),
    "hybrid-liger-gla-recurrent": dict(method="liger-gla", window=0, gate="mamba2", softmax_layers=[1]),
}


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_on_a_left_padded_batch_equals_each_row_alone(make_tiny_model, case):
    """num_beams=3 over rows padded by 0, 3 and 7 tokens returns, for each row, the sequence
    that row's prompt returns alone: the cache's reorder (beam_idx) and repeat_interleave
    carry the padding with each beam, and no beam of one row sees another row. No EOS, so
    every hypothesis has the same length and the length penalty cannot reorder them."""
    model = student(make_tiny_model, **BEAM_CASES[case])
    pads = (0, 3, 7)
    ids, mask = left_padded(pads, 14, seed=1)
    kw = dict(max_new_tokens=7, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for row, p in enumerate(pads):
            alone = model.generate(ids[row:row + 1, p:], **kw)
            assert torch.equal(batch[row, p:], alone[0]), f"row {row} (pad {p}): {batch[row, p:]} vs {alone[0]}"
