"""Own metrics on a tiny random Llama: perplexity, agreement, passkey, MQAR, held-out text."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from linearize.eval import passkey as passkey_mod
from linearize.eval.agreement import teacher_agreement
from linearize.eval.heldout import HELDOUT_SIZE, heldout_texts, training_titles
from linearize.eval.mqar import make_mqar_sample, mqar_accuracy
from linearize.eval.passkey import make_passkey_sample, passkey_retrieval, special_prefix
from linearize.eval.perplexity import perplexity, sliding_windows

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "A",
    "Linear attention keeps a constant-size state per layer while it decodes.",
]


@torch.no_grad()
def test_perplexity_is_exp_mean_token_ce(eval_model, eval_tokenizer):
    total, count = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([eval_tokenizer(text)["input_ids"]])
        if ids.shape[1] < 2:
            continue
        logits = eval_model(ids).logits[0, :-1]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    r = perplexity(eval_model, eval_tokenizer, TEXTS, max_length=512, stride=256, batch_size=3)
    assert r["tokens"] == count
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_windows_score_every_token_once():
    for n, L, s in [(100, 16, 8), (100, 16, 15), (17, 16, 1), (16, 16, 4), (5, 16, 8), (1, 4, 2)]:
        targets = []
        for start, end, first in sliding_windows(n, L, s):
            assert end - start <= L and start < first <= end
            assert first == 1 or first - start >= L - s
            targets += range(first, end)
        assert targets == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 8)


@torch.no_grad()
def test_perplexity_sliding_windows_match_per_window_loop(eval_model, eval_tokenizer):
    text = " ".join(heldout_texts(2))
    ids = eval_tokenizer(text)["input_ids"][:150]
    text = eval_tokenizer.decode(ids)
    ids = eval_tokenizer(text)["input_ids"]
    L, s = 48, 20
    total = 0.0
    for start, end, first in sliding_windows(len(ids), L, s):
        logp = F.log_softmax(eval_model(torch.tensor([ids[start:end]])).logits[0], -1)
        total -= sum(float(logp[t - start - 1, ids[t]]) for t in range(first, end))
    r = perplexity(eval_model, eval_tokenizer, [text], max_length=L, stride=s, batch_size=4)
    assert r["tokens"] == len(ids) - 1
    assert r["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)


def test_agreement_of_a_model_with_itself(eval_model, eval_tokenizer):
    texts = heldout_texts(3)
    for teacher in (eval_model, None):  # None: linearize.teacher, a no-op on a plain model
        r = teacher_agreement(eval_model, teacher, eval_tokenizer, texts, max_length=64, bin_size=16)
        assert r["top1_agreement"] == 100.0
        assert r["kl_mean"] == pytest.approx(0.0, abs=1e-6)
        assert r["tokens"] == sum(min(64, len(eval_tokenizer(t)["input_ids"])) for t in texts)
        assert len(r["kl_by_position"]) == 4


def test_agreement_detects_a_different_model(eval_model, eval_tokenizer):
    other = copy.deepcopy(eval_model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn_like(other.lm_head.weight))
    r = teacher_agreement(other, eval_model, eval_tokenizer, heldout_texts(2), max_length=64)
    assert r["top1_agreement"] < 100.0 and r["kl_mean"] > 1e-3


def test_agreement_against_own_teacher_matches_an_unconverted_copy(eval_model, eval_tokenizer):
    import linearize

    original = copy.deepcopy(eval_model)
    student = linearize.convert(copy.deepcopy(eval_model), linearize.LinearizeConfig(method="liger-gla"))
    texts = heldout_texts(2)
    via_context = teacher_agreement(student, None, eval_tokenizer, texts, max_length=40)
    via_copy = teacher_agreement(student, original, eval_tokenizer, texts, max_length=40)
    assert via_context["top1_agreement"] == pytest.approx(via_copy["top1_agreement"])
    assert via_context["kl_mean"] == pytest.approx(via_copy["kl_mean"], rel=1e-4, abs=1e-7)
    assert via_context["kl_mean"] > 0


def test_teacher_of_an_adapted_student_is_the_unconverted_original(eval_model):
    """`linearize.teacher` on a PeftModel: adapters off and softmax attention on, both undone after."""
    import linearize
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    original = copy.deepcopy(eval_model)
    student = linearize.convert(copy.deepcopy(eval_model), linearize.LinearizeConfig(method="liger-gla"))
    peft_model = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, eval_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with linearize.teacher(peft_model):
            as_teacher = peft_model(input_ids=ids).logits
        torch.testing.assert_close(as_teacher, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted)  # adapters and mixers back on
    assert not torch.allclose(adapted, as_teacher, atol=1e-3)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_needle_sits_at_its_depth(eval_tokenizer, depth):
    s = make_passkey_sample(eval_tokenizer, 600, depth, passkey=48213)
    ids = s.input_ids.tolist()
    assert len(ids) <= 600
    assert "48213" in eval_tokenizer.decode(ids[s.needle_start : s.needle_end])
    assert eval_tokenizer.decode(ids).count("48213") == 2
    assert s.filler_before == round(depth * s.filler_total)
    filler = len(eval_tokenizer.encode(passkey_mod.FILLER, add_special_tokens=False))
    head = len(special_prefix(eval_tokenizer)) + len(eval_tokenizer.encode(passkey_mod.PREAMBLE, add_special_tokens=False))
    assert s.needle_start == head + s.filler_before * filler
    assert eval_tokenizer.decode(ids).endswith(passkey_mod.QUESTION)
    if depth == 1.0:
        question = len(eval_tokenizer.encode(passkey_mod.QUESTION, add_special_tokens=False))
        assert s.needle_end == len(ids) - question


def test_passkey_scoring_is_greedy_exact_match(eval_model, eval_tokenizer, monkeypatch):
    def oracle(model, input_ids, max_new_tokens):
        key = re.search(r"pass key is (\d+)", eval_tokenizer.decode(input_ids)).group(1)
        return torch.tensor(eval_tokenizer.encode(f" {key}.", add_special_tokens=False))

    monkeypatch.setattr(passkey_mod, "greedy_continue", oracle)
    r = passkey_retrieval(eval_model, eval_tokenizer, lengths=(200, 300), depths=(0.0, 1.0), trials=2)
    assert r["accuracy"] == [[100.0, 100.0], [100.0, 100.0]] and r["mean_accuracy"] == 100.0
    monkeypatch.setattr(passkey_mod, "greedy_continue",
                        lambda m, i, max_new_tokens: torch.tensor(eval_tokenizer.encode(" 12", add_special_tokens=False)))
    assert passkey_retrieval(eval_model, eval_tokenizer, lengths=(200,), depths=(0.5,))["mean_accuracy"] == 0.0


def test_passkey_runs_generation_on_a_real_model(eval_model, eval_tokenizer):
    r = passkey_retrieval(eval_model, eval_tokenizer, lengths=(160, 200), depths=(0.0, 1.0))
    assert len(r["accuracy"]) == 2 and len(r["accuracy"][0]) == 2
    assert len(r["outputs"]) == 4 and all(0 <= a <= 100 for row in r["accuracy"] for a in row)


def test_mqar_answers_are_where_the_sample_says(eval_tokenizer):
    s = make_mqar_sample(eval_tokenizer, num_pairs=12, num_queries=7, seed=3)
    ids = s.input_ids
    binding = dict(s.pairs)
    colon = eval_tokenizer.encode(":", add_special_tokens=False)
    assert len(s.answer_positions) == 7 and len(set(k for k, _ in s.pairs)) == 12
    recall_start = int(s.answer_positions[0]) - len(colon) - 1
    for pos, answer, key in zip(s.answer_positions.tolist(), s.answers.tolist(), s.query_keys.tolist()):
        assert ids[pos] == answer == binding[key]
        assert ids[pos - len(colon) - 1] == key
        assert ids[pos - len(colon) : pos].tolist() == colon
        context = ids[:recall_start].tolist()
        k = context.index(key)
        assert context[k + len(colon) + 1] == answer
    assert "Now recall." in eval_tokenizer.decode(ids[:recall_start + 1])
    with pytest.raises(ValueError, match="single-token keys"):
        make_mqar_sample(eval_tokenizer, num_pairs=500)


def test_mqar_accuracy_shape(eval_model, eval_tokenizer):
    r = mqar_accuracy(eval_model, eval_tokenizer, num_pairs=(2, 4), num_samples=3, batch_size=2)
    assert r["num_pairs"] == [2, 4] and len(r["accuracy"]) == 2
    assert all(0 <= a <= 100 for a in r["accuracy"])


def test_heldout_slice_is_fixed_and_disjoint_from_training():
    a, b = heldout_texts(), heldout_texts(5)
    assert len(a) == HELDOUT_SIZE and a[:5] == b
    assert len(set(training_titles())) + HELDOUT_SIZE > 9000
    with pytest.raises(ValueError):
        heldout_texts(HELDOUT_SIZE + 1)


def test_passkey_distance_and_min_distance(eval_model, eval_tokenizer, monkeypatch):
    s = make_passkey_sample(eval_tokenizer, 600, 0.25)
    assert s.distance == len(s.input_ids) - s.needle_end > 300
    monkeypatch.setattr(passkey_mod, "greedy_continue",
                        lambda m, i, max_new_tokens: torch.tensor(eval_tokenizer.encode(" 1", add_special_tokens=False)))
    r = passkey_retrieval(eval_model, eval_tokenizer, lengths=(300, 600), depths=(0.0, 0.5), min_distance=100)
    assert all(d >= 100 for row in r["distances"] for d in row) and r["distances"][1][0] > r["distances"][1][1]
    assert {o["distance"] for o in r["outputs"]} == {d for row in r["distances"] for d in row}
    with pytest.raises(ValueError, match=r"closer than min_distance=100 .*length 300 depth 1.0"):
        passkey_retrieval(eval_model, eval_tokenizer, lengths=(300,), depths=(0.0, 1.0), min_distance=100)


def test_mqar_length_puts_filler_between_pairs_and_queries(eval_model, eval_tokenizer):
    short = make_mqar_sample(eval_tokenizer, num_pairs=6, seed=1)
    long = make_mqar_sample(eval_tokenizer, num_pairs=6, seed=1, length=300)
    assert len(long.input_ids) == 300 and long.pairs == short.pairs
    assert long.gap == short.gap + 300 - len(short.input_ids)
    assert torch.equal(long.input_ids[long.answer_positions[0] - 2:], short.input_ids[short.answer_positions[0] - 2:])
    assert torch.equal(long.input_ids[:long.answer_positions[0] - 2 - long.gap],
                       short.input_ids[:short.answer_positions[0] - 2 - short.gap])
    assert torch.equal(long.input_ids[long.answer_positions], long.answers)
    assert "The grass is green." in eval_tokenizer.decode(long.input_ids)
    r = mqar_accuracy(eval_model, eval_tokenizer, num_pairs=(2, 4), num_samples=2, batch_size=2, length=256)
    assert r["length"] == 256 and len(r["gaps"]) == 2 and min(r["gaps"]) > 200
    with pytest.raises(ValueError, match="too short for 6 MQAR pairs"):
        make_mqar_sample(eval_tokenizer, num_pairs=6, length=20)
