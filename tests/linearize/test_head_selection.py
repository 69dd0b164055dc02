"""`linearize select-heads`: per-(layer, KV head) passkey scores, the budgeted choice and the command,
on a tiny random Llama with a character-level tokenizer (offline, fast)."""
import json

import pytest
import torch
import torch.nn.functional as F

import linearize
from helpers.threads import one_thread  # noqa: F401
from helpers.tiny import save_tiny_model as save_shared_tiny_model
from linearize.cli import main
from linearize.head_selection import (full_heads_in, head_scores, heads_argument, passkey_rows, ranked_heads,
                                      select_full_heads)

CONFIG = dict(method="liger-gla", window=8)
LENGTHS, DEPTHS = [600], [0.0, 0.5]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), folder


def save_tiny_model(folder) -> None:
    """The shared tiny source model, with room for 1,024 positions."""
    save_shared_tiny_model(folder, max_position_embeddings=1024)


def model_from(folder, **config):
    from transformers import AutoModelForCausalLM

    return linearize.convert(AutoModelForCausalLM.from_pretrained(folder).eval(), **{**CONFIG, **config})


def answer_ce(model, row) -> float:
    """Mean CE of the answer tokens from the full logits (independent of `answer_loss`)."""
    with torch.no_grad():
        logits = model(row.ids, use_cache=False).logits[0, row.answer_start - 1:-1]
    return F.cross_entropy(logits.double(), row.ids[0, row.answer_start:], reduction="sum").item()


def test_rows_hold_the_answer_after_the_prompt_and_refuse_close_needles(tokenizer):
    tok, _ = tokenizer
    rows = passkey_rows(tok, LENGTHS, DEPTHS, min_distance=8)
    assert len(rows) == 2 and all(r.distance >= 8 for r in rows)
    decode = lambda ids: tok.decode(ids).replace(" ", "")  # noqa: E731 (the character tokenizer spaces tokens)
    key = decode(rows[0].ids[0, rows[0].answer_start:])
    assert key.isdigit() and f"passkeyis{key}." in decode(rows[0].ids[0, :rows[0].answer_start])
    with pytest.raises(ValueError, match="min_distance"):
        passkey_rows(tok, LENGTHS, [1.0], min_distance=100)


def test_scores_are_the_answer_loss_drop_of_a_converted_model_with_that_head_full(tokenizer):
    tok, folder = tokenizer
    model = model_from(folder)
    rows = passkey_rows(tok, LENGTHS, DEPTHS, min_distance=8)
    scores = head_scores(model, rows)
    assert sorted(scores.per_head) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    tokens = sum(r.ids.shape[1] - r.answer_start for r in rows)
    base = sum(answer_ce(model, r) for r in rows)
    assert scores.base_loss == pytest.approx(base / tokens, rel=1e-4)
    for layer, head in [(0, 1), (1, 0)]:
        other = model_from(folder, full_attention_heads={layer: [head]})
        expected = (base - sum(answer_ce(other, r) for r in rows)) / tokens
        assert scores.per_head[(layer, head)] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert [m.full_heads for m in linearize.mixers(model)] == [[], []]  # put back


def test_every_head_full_gives_the_teachers_loss(tokenizer):
    tok, folder = tokenizer
    model = model_from(folder)
    row = passkey_rows(tok, LENGTHS, [0.0], min_distance=8)[0]
    with linearize.teacher(model):
        teacher = answer_ce(model, row)
    with full_heads_in(model, {0: [0, 1], 1: [0, 1]}):
        assert answer_ce(model, row) == pytest.approx(teacher, rel=1e-5)


def test_choice_takes_the_best_heads_and_keeps_those_already_full():
    per_head = {(0, 0): 0.1, (0, 1): 0.5, (1, 0): 0.3, (1, 1): 0.3}
    assert ranked_heads(per_head) == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert select_full_heads(per_head, 2) == {0: [1], 1: [0]}
    assert heads_argument({0: [1], 1: [0, 1]}) == "0:1,1:0,1:1"
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match="budget must be an integer from 1 to 4"):
            select_full_heads(per_head, bad)


def test_select_heads_command_writes_a_choice_that_converts(tokenizer, tmp_path, capsys):
    _, folder = tokenizer
    out = tmp_path / "heads.json"
    rc = main(["select-heads", str(folder), "--budget", "2", "--method", "liger-gla", "--window", "8",
               "--lengths", "600", "--depths", "0,0.5", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    chosen = {int(k): v for k, v in result["full_attention_heads"].items()}
    assert sum(len(v) for v in chosen.values()) == 2
    assert len(result["scores"]) == 4
    assert "convert with: --full-attention-heads" in capsys.readouterr().out
    config = linearize.LinearizeConfig.from_dict(result["linearize_config"])
    assert config.full_attention_heads == chosen
    model = model_from(folder, full_attention_heads=chosen)
    assert {m.layer_idx: m.full_heads for m in linearize.mixers(model) if m.full_heads} == chosen


def test_select_heads_refuses_bad_input_before_scoring(tokenizer, capsys):
    _, folder = tokenizer
    assert main(["select-heads", str(folder), "--budget", "9", "--method", "liger-gla", "--window", "8",
                 "--lengths", "600", "--depths", "0"]) == 2
    assert "budget must be an integer from 1 to 4" in capsys.readouterr().err
    assert main(["select-heads", str(folder), "--budget", "1", "--method", "liger-gla", "--window", "8",
                 "--lengths", "600", "--depths", "1.0", "--min-distance", "200"]) == 2
    assert "min_distance" in capsys.readouterr().err


def test_cli_refuses_full_heads_for_a_converted_source(tmp_path, capsys):
    save_tiny_model(tmp_path / "tiny")
    assert main(["convert", str(tmp_path / "tiny"), "--method", "liger-gla", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["select-heads", str(tmp_path / "c"), "--full-attention-heads", "0:0", "--budget", "1"]) == 2
    assert "conversion options (full_attention_heads) would be ignored" in capsys.readouterr().err
