"""MQAR scoring on models whose accuracy is known before they run.

The stand-in models read the token ids and do the recall themselves (no learning): after
`key :` one predicts the value that followed `key :` in the pairs (always right), one
predicts the key again (never a value: 0 %), one recalls only keys from the first half of
the pairs (every key is asked once, so exactly 50 %). A score read at the wrong position,
against the wrong token or averaged wrongly misses these numbers.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from linearize.eval.mqar import mqar_accuracy


class RecallModel(torch.nn.Module):
    """input_ids [B, T] -> logits [B, T, V] with one hot guess after every `key <colon>`."""

    def __init__(self, vocab_size: int, colon: list[int], mode: str):
        super().__init__()
        self.vocab_size, self.colon, self.mode = vocab_size, colon, mode
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # mqar_accuracy reads the device from it

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        c = len(self.colon)
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            ids = input_ids[b].tolist()
            keyed = [j for j in range(T - c - 1) if ids[j + 1:j + 1 + c] == self.colon]  # `key :` starts
            pairs = []  # the first `key :` of each key: the pairs, in context order
            for j in keyed:
                if ids[j] not in [ids[i] for i in pairs]:
                    pairs.append(j)
            for t in range(c, T):
                if ids[t - c + 1:t + 1] != self.colon:
                    continue
                key = ids[t - c]
                pair = next((i for i, j in enumerate(pairs) if ids[j] == key and j < t - c), None)
                if pair is None:
                    continue
                recalls = self.mode == "recall" or (self.mode == "first-half" and pair < len(pairs) // 2)
                logits[b, t, ids[pairs[pair] + 1 + c] if recalls else key] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("mode, expected", [("recall", 100.0), ("echo", 0.0), ("first-half", 50.0)])
def test_mqar_scores_a_model_whose_answers_are_known(eval_tokenizer, mode, expected):
    colon = eval_tokenizer.encode(":", add_special_tokens=False)
    model = RecallModel(len(eval_tokenizer), colon, mode)
    r = mqar_accuracy(model, eval_tokenizer, num_pairs=(4, 8), num_samples=5, batch_size=3)
    assert r["accuracy"] == [expected, expected] and r["mean_accuracy"] == expected
    long = mqar_accuracy(model, eval_tokenizer, num_pairs=(6,), num_samples=2, batch_size=2, length=160)
    assert long["accuracy"] == [expected] and long["gaps"][0] > 60
