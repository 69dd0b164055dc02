"""KL-guided layer selection: per-layer scores, the budgeted choice and `linearize select-layers`."""
import copy
import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.layer_selection import kl_per_token, layer_scores, select_softmax_layers, softmax_in
from tests.helpers.threads import one_thread  # noqa: F401
from tests.helpers.tiny import save_tiny_model, tiny_model

T = 24
# liger-gla started at the baseline is window + sinks; a window over the whole row makes every
# layer's student exactly its teacher until a layer's linear branch gets weight.
CONFIG = dict(method="liger-gla", init="baseline", window=64)
BAD, MILD = 2, 0


def model_with_off_layers(**config):
    """4-layer tiny Llama, layer BAD far from its teacher, layer MILD a little, the rest equal to it."""
    torch.manual_seed(0)
    model = linearize.convert(tiny_model("llama", num_hidden_layers=4), **{**CONFIG, **config})
    with torch.no_grad():
        for m in linearize.mixers(model):
            weight = {BAD: 8.0, MILD: 2.0}.get(m.layer_idx)
            if weight is not None:
                m.linearize_linear_weight.fill_(weight)
    return model


def rows(n=2):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (1, T), generator=gen) for _ in range(n)]


def direct_kl(student, reference, ids) -> float:
    """KL(teacher || student) per token with the teacher taken from `reference` (fp64)."""
    with torch.no_grad():
        with linearize.teacher(reference):
            t = torch.log_softmax(reference(ids).logits.double(), -1)
        s = torch.log_softmax(student(ids).logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_kl_is_forward_kl_against_an_fp64_reference():
    gen = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(2, 3, 7, generator=gen) * 3, torch.randn(2, 3, 7, generator=gen) * 3
    p, q = torch.softmax(t_logits.double(), -1), torch.softmax(s_logits.double(), -1)
    expected = torch.tensor([[sum(p[b, i, v] * (p[b, i, v] / q[b, i, v]).log() for v in range(7)) for i in range(3)]
                             for b in range(2)], dtype=torch.float64)
    got = kl_per_token(torch.log_softmax(t_logits, -1), s_logits).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    reverse = (q * (q / p).log()).sum(-1)
    assert not torch.allclose(got, reverse, rtol=1e-2)


def test_only_the_named_layers_run_softmax_and_the_switch_is_restored():
    model = model_with_off_layers()
    with softmax_in(model, [1, 3]):
        assert [m.teacher_active for m in linearize.mixers(model)] == [False, True, False, True]
    assert not any(m.teacher_active for m in linearize.mixers(model))


@pytest.mark.parametrize("score", ["restore", "single"])
def test_a_layer_equal_to_its_teacher_scores_zero_and_the_worst_layer_ranks_first(score):
    scores = layer_scores(model_with_off_layers(), rows(), score=score)
    assert sorted(scores.per_layer) == [0, 1, 2, 3]
    for equal in (1, 3):
        assert abs(scores.per_layer[equal]) < 1e-6, scores.per_layer
    assert scores.per_layer[BAD] > scores.per_layer[MILD] > 1e-4
    assert scores.tokens == 2 * T and scores.all_linear_kl > scores.per_layer[BAD] * 0.99
    assert select_softmax_layers(scores, 1) == [BAD]
    assert select_softmax_layers(scores, 2) == sorted([BAD, MILD])
    assert scores.table().splitlines()[1].split()[:2] == [str(BAD), "1"]


def test_scores_equal_the_kl_of_models_converted_with_those_layers():
    """restore: KL(all linear) - KL(model converted with softmax_layers=[i]); single: KL of a
    model converted with layers=[i]; both measured on fresh conversions, not the switch."""
    ids = rows(1)
    model = model_with_off_layers()
    restore = layer_scores(model, ids, score="restore").per_layer
    single = layer_scores(model, ids, score="single").per_layer
    all_linear = direct_kl(model, model, ids[0])
    for i in (MILD, BAD):
        kept = copy.deepcopy(model)
        linearize.unconvert(kept)
        only_i = copy.deepcopy(kept)
        model_with_i_softmax = linearize.convert(kept, **CONFIG, softmax_layers=[i])
        model_with_only_i = linearize.convert(only_i, **CONFIG, layers=[i])
        for converted in (model_with_i_softmax, model_with_only_i):
            with torch.no_grad():
                for m in linearize.mixers(converted):
                    m.linearize_linear_weight.copy_(linearize.mixers(model)[m.layer_idx].linearize_linear_weight)
        assert restore[i] == pytest.approx(all_linear - direct_kl(model_with_i_softmax, model, ids[0]), rel=1e-3, abs=1e-6)
        assert single[i] == pytest.approx(direct_kl(model_with_only_i, model, ids[0]), rel=1e-3, abs=1e-6)


def test_layers_already_softmax_are_not_scored_and_stay_in_the_choice():
    scores = layer_scores(model_with_off_layers(softmax_layers=[1]), rows(1))
    assert sorted(scores.per_layer) == [0, 2, 3] and scores.kept == [1]
    assert select_softmax_layers(scores, 1) == [1, BAD]


@pytest.mark.parametrize("budget", [0, 4, -1, 1.5, True])
def test_a_budget_outside_1_to_layers_minus_1_is_refused(budget):
    with pytest.raises(ValueError, match=r"budget must be an integer from 1 to 3 .* got"):
        select_softmax_layers({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.0}, budget)


def test_an_unknown_score_and_an_empty_text_set_are_refused():
    model = model_with_off_layers()
    with pytest.raises(ValueError, match="unknown score 'reverse'; choose one of: restore, single"):
        layer_scores(model, rows(1), score="reverse")
    with pytest.raises(ValueError, match="no text to score on"):
        layer_scores(model, [])


def test_cli_writes_a_choice_that_convert_accepts(tmp_path, capsys):
    src, text, out = tmp_path / "tiny", tmp_path / "text.txt", tmp_path / "choice.json"
    save_tiny_model(src)
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    args = ["select-layers", str(src), "--method", "liger-gla", "--window", "4", "--budget", "1", "--texts", str(text),
            "--num-texts", "3", "--length", "40", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["rows"] == 3 and result["tokens"] == 120 and sorted(result["scores"]) == ["0", "1"]
    best = max(result["scores"], key=lambda k: result["scores"][k])
    assert result["softmax_layers"] == [int(best)] and f"convert with: --softmax-layers {best}" in printed
    config = linearize.LinearizeConfig.from_dict(result["linearize_config"])
    assert config.softmax_layers == [int(best)] and config.window == 4
    converted = tmp_path / "converted"
    assert main(["convert", str(src), "--method", "liger-gla", *result["convert_arguments"].split(),
                 "--out", str(converted), "--quiet"]) == 0
    saved = json.loads((converted / "config.json").read_text())["linearize"]
    assert saved["softmax_layers"] == [int(best)]


@pytest.mark.parametrize("extra, words", [
    (["--budget", "2"], "budget must be an integer from 1 to 1"),
    (["--budget", "1", "--texts", "/no/such/file"], "neither 'held-out' nor a text file"),
])
def test_cli_bad_input_exits_with_a_clear_error(tmp_path, capsys, extra, words):
    save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("some text to score on")
    args = ["select-layers", str(tmp_path / "tiny"), "--method", "liger-gla", "--window", "4", "--texts", str(text)]
    assert main(args + extra) == 2
    assert words in capsys.readouterr().err


def test_cli_refuses_conversion_options_for_a_converted_source(tmp_path, capsys):
    save_tiny_model(tmp_path / "tiny")
    assert main(["convert", str(tmp_path / "tiny"), "--method", "liger-gla", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["select-layers", str(tmp_path / "c"), "--window", "8", "--budget", "1"]) == 2
    assert "already converted: conversion options (window) would be ignored" in capsys.readouterr().err
    assert main(["select-layers", str(tmp_path / "c"), "--full-attention-heads", "0:0", "--budget", "1"]) == 2
    assert "conversion options (full_attention_heads) would be ignored" in capsys.readouterr().err
