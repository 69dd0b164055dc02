"""Data: packing, document boundaries, response-only labels, order, and bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from linearize.distill import DataError, build_rows, load_recipe
from linearize.distill.data import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(assets):
    return AutoTokenizer.from_pretrained(assets / "model")


def data_section(**over):
    return load_recipe(None, [f"data.{k}={v}" for k, v in over.items()]).data


def test_packing_restarts_positions_per_document(assets, tok):
    rows = build_rows(data_section(source=str(assets / "docs.jsonl"), shuffle="false"), tok, 64, 1, 20, 0)
    assert rows.input_ids.shape == (20, 64) and rows.attention_mask is None
    ids, pos, lab = rows.input_ids, rows.position_ids, rows.labels
    starts = ids == tok.bos_token_id
    assert torch.equal(pos == 0, starts | (torch.arange(64) == 0))  # 0 at every document start (and row start)
    assert (lab[starts] == IGNORE_INDEX).all()  # a document's first token is never predicted across the boundary
    eos_next = (ids[:, :-1] == tok.eos_token_id)
    assert (ids[:, 1:][eos_next] == tok.bos_token_id).all()  # documents are EOS-separated
    assert (lab != IGNORE_INDEX).float().mean() > 0.9


def test_eos_boundaries_with_larger_batches(assets, tok):
    rows = build_rows(data_section(source=str(assets / "docs.jsonl")), tok, 64, 2, 4, 0)
    assert rows.position_ids is None  # auto: batch_size 2 keeps only the EOS separator


def test_alpaca_loss_on_response_only(assets, tok):
    d = data_section(source=str(assets / "alpaca.json"), packing="false", shuffle="false")
    rows = build_rows(d, tok, 96, 1, 10, 0)
    records = json.loads((assets / "alpaca.json").read_text())
    for r in range(4):
        target = tok(records[r]["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lab = rows.labels[r][rows.labels[r] != IGNORE_INDEX].tolist()
        assert lab == target
        assert rows.attention_mask[r].sum() == (rows.input_ids[r] != tok.eos_token_id).sum() + 1


def test_order_is_deterministic_and_reshuffles_per_pass(assets, tok):
    rows = build_rows(data_section(source=str(assets / "docs.jsonl")), tok, 64, 1, 8, 0)
    n = len(rows)
    first = rows.order(0, n, seed=0)
    assert first == list(range(n))
    second = rows.order(n, n, seed=0)
    assert sorted(second) == list(range(n)) and second != first
    assert rows.order(3, 2 * n, seed=0) == (first + second + rows.order(2 * n, n, seed=0))[3:3 + 2 * n]


def test_text_files_and_folders(tmp_path, tok):
    (tmp_path / "a.txt").write_text("w1 w2 w3 w4\n\nw5 w6 w7 w8 w9\n")
    rows = build_rows(data_section(source=str(tmp_path)), tok, 4, 1, 10, 0)
    assert rows.num_documents == 2 and len(rows) >= 3


def test_bad_data_errors(assets, tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_rows(data_section(source=str(tmp_path / "nope.jsonl")), tok, 32, 1, 4, 0)
    with pytest.raises(DataError, match="empty"):
        build_rows(data_section(source=str(assets / "empty.jsonl")), tok, 32, 1, 4, 0)
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    with pytest.raises(DataError, match="set data.text_field"):
        build_rows(data_section(source=str(tmp_path / "x.jsonl")), tok, 32, 1, 4, 0)
    with pytest.raises(DataError, match="no training row of 4096 tokens"):
        build_rows(data_section(source=str(assets / "alpaca.json"), max_documents=2), tok, 4096, 1, 4, 0)
    with pytest.raises(DataError, match="could not load hub data set"):
        build_rows(data_section(source="nobody/no-such-dataset-here"), tok, 32, 1, 4, 0)
