"""`LinearizeLM` (the registered `linearize` lm-eval model) scores exactly as lm-eval's own `hf`
model (`HFLM`) on the same weights: an unconverted folder, and a converted one in teacher mode.

HFLM is built on the in-memory model and tokenizer; LinearizeLM loads the saved folder
through `linearize.load`. Both run fp32 on the CPU with the same batch size and max_length
(64, so the rolling log-likelihood of the longer text spans several windows)."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from linearize.eval.heldout import heldout_texts
from linearize.eval.lm_model import LinearizeLM

KW = dict(batch_size=3, max_length=64)
PAIRS = [("The capital of France is", " Paris"), ("apple: north, chair: south. Now recall. apple:", " north"),
         ("Question: two plus two?\nAnswer:", " four"), ("Remember these pairs.", " river stone cloud"),
         ("", " a single continuation with no context")]
TOL = 1e-5  # same weights, same model class; the two differ at most in batching order


@pytest.fixture(scope="module")
def reference(eval_model, eval_tokenizer):
    return HFLM(pretrained=eval_model, tokenizer=eval_tokenizer, backend="causal", **KW)


@pytest.fixture(scope="module")
def greedy_pair(eval_model, eval_tokenizer):
    """A context and the model's own greedy next token (its is_greedy flag is True)."""
    context = "The capital of France is"
    ids = torch.tensor([eval_tokenizer.encode(context)])
    with torch.no_grad():
        token = eval_model(ids).logits[0, -1].argmax().item()
    return context, eval_tokenizer.decode([token])


def requests(greedy_pair):
    pairs = PAIRS + [greedy_pair]
    loglik = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    texts = ["A short text.", heldout_texts(1)[0][:1200]]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    return loglik, rolling


def assert_same_scores(lm, reference, greedy_pair):
    loglik, rolling = requests(greedy_pair)
    ours, theirs = lm.loglikelihood(loglik), reference.loglikelihood(loglik)
    assert len(ours) == len(loglik) and len({round(lp, 4) for lp, _ in theirs}) == len(loglik)
    assert theirs[-1][1] and not theirs[0][1]
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs):
        assert abs(lp - ref_lp) <= TOL * abs(ref_lp) and greedy == ref_greedy
    ours, theirs = lm.loglikelihood_rolling(rolling), reference.loglikelihood_rolling(rolling)
    assert len(reference.tok_encode(rolling[1].args[0])) > KW["max_length"]  # several windows
    for lp, ref_lp in zip(ours, theirs):
        assert abs(lp - ref_lp) <= TOL * abs(ref_lp)


def test_linearize_lm_equals_hflm_on_an_unconverted_model(eval_model_dir, reference, greedy_pair):
    lm = LinearizeLM(pretrained=str(eval_model_dir), device="cpu", **KW)
    assert not lm.is_linearized
    assert_same_scores(lm, reference, greedy_pair)


def test_linearize_lm_teacher_mode_equals_hflm_on_the_original(linearized_dir, reference, greedy_pair):
    """The converted checkpoint of the same weights, scored with teacher=True, is the original."""
    lm = LinearizeLM(pretrained=str(linearized_dir), teacher=True, device="cpu", **KW)
    assert lm.is_linearized
    assert_same_scores(lm, reference, greedy_pair)
    student = LinearizeLM(pretrained=str(linearized_dir), device="cpu", **KW)
    loglik, _ = requests(greedy_pair)
    assert student.loglikelihood(loglik)[0][0] != reference.loglikelihood(loglik)[0][0]
