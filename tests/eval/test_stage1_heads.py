"""scripts/stage1_rows.py's per-head stage-1 errors: split over the heads, they average to the
layer MSE that stage 1 trains on and logs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package

import linearize  # noqa: E402
from linearize.mixers import AttentionTransfer  # noqa: E402
from stage1_rows import HeadErrors, head_mse  # noqa: E402


def test_head_errors_average_to_the_layer_mse(make_tiny_model):
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="lolcats", init="paper")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    layers = list(linearize.mixers(model))
    per_head, whole = HeadErrors(layers[0].num_heads), AttentionTransfer()
    for hook in (per_head, whole):
        for m in layers:
            m.transfer = hook
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    assert len(per_head.per_head) == len(layers) and per_head.per_head[0].shape == (layers[0].num_heads,)
    assert all(h.min() > 0 for h in per_head.per_head)  # an untrained paper init differs from the teacher in every head
    torch.testing.assert_close(torch.stack(per_head.losses), torch.stack(whole.losses), rtol=1e-5, atol=0)


def test_head_mse_refuses_a_method_that_compares_after_o_proj(make_tiny_model):
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="liger-gla")
    with pytest.raises(ValueError, match="after o_proj"):
        head_mse(model, None, ["text"])


def test_head_mse_per_layer_and_head_leaves_the_model_as_it_was(make_tiny_model):
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=2), method="lolcats", init="paper").train()
    vocab = model.config.vocab_size
    tokenizer = lambda text: {"input_ids": [hash(w) % vocab for w in text.split()]}  # noqa: E731
    errors = head_mse(model, tokenizer, ["a b c d e f g h", "i j k l"])
    layers = list(linearize.mixers(model))
    assert list(errors) == [str(m.layer_idx) for m in layers]
    assert all(len(v) == layers[0].num_heads and min(v) > 0 for v in errors.values())
    assert model.training and all(m.transfer is None for m in layers)


def test_head_errors_leave_padding_out_as_stage_1_does():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 4 * 8, generator=gen), torch.randn(2, 6, 4 * 8, generator=gen)
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    student[~mask] = 1e6  # padding positions: any error there must not count
    per_head, whole = HeadErrors(4), AttentionTransfer()
    for hook in (per_head, whole):
        hook.record(student, teacher, mask, scale=1000.0)
    torch.testing.assert_close(per_head.losses[0], whole.losses[0], rtol=1e-5, atol=0)
    kept = (student - teacher)[mask].pow(2).view(-1, 4, 8).mean((0, 2)) * 1000  # [H] over the real tokens
    torch.testing.assert_close(per_head.per_head[0], kept, rtol=1e-5, atol=0)


def test_shipped_section_counts_halved_layers_and_names_the_rest():
    from stage1_rows import shipped_section

    record = {"tokens": 65536, "seq_len": 2048, "steps": 32, "train_seconds": 600.0, "ppl_before": 20.0,
              "ppl_after": 19.0, "before": {"0": 2.0, "1": 4.0, "2": 1.0}, "after": {"0": 1.0, "1": 3.0, "2": 0.2}}
    lines = "\n".join(shipped_section({"shipped-rows2048-64k": record}))
    assert "| 65,536 tokens at 2,048-token rows | 32 | 10.0 | 2.33 -> 1.40 | 2/3 | L1 0.75 | 20.00 -> 19.00 |" in lines
    assert "layers above half their MSE: L1 (0.75)." in lines
    labelled = "\n".join(shipped_section({"shipped-shared-rows2048-64k": {**record, "label": "window 512, one state per KV head"}}))
    assert "| window 512, one state per KV head: 65,536 tokens at 2,048-token rows | 32 |" in labelled
    assert shipped_section({}) == []
