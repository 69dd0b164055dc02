"""MQAR-style multi-query associative recall for pretrained LMs.

A sample lists ``num_pairs`` key-value pairs, then asks for the values of ``num_queries``
of the keys, in a shuffled order::

    Remember these pairs. apple: river, chair: stone, ... Now recall. chair: stone, apple: river, ...

Keys and values are single tokens, and the sequence is assembled from token ids, so the
position of every answer is known exactly. Scoring is teacher-forced next-token accuracy
at the answer positions: the model must predict each value from its key, which only works
if the key-value binding survived in its state (the gap between linear and softmax
attention grows with ``num_pairs``).

With ``length`` set, filler sentences (the passkey probe's) stand between the pairs and
"Now recall." so the sequence is exactly ``length`` tokens and every key sits at least
``gap`` tokens before its query: past a sliding window shorter than the gap, only the
recurrent state can carry the binding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .passkey import FILLER, special_prefix
from .progress import bar

KEY_WORDS = (
    "apple chair river stone cloud table horse paper glass music garden window bottle "
    "castle forest island letter mirror pencil rocket silver tiger violin wallet anchor "
    "basket candle desert engine falcon guitar hammer jacket kettle ladder magnet needle "
    "orange pillow rabbit saddle tunnel umbrella wagon yellow zebra bridge cotton dragon "
    "finger ginger helmet insect jungle lemon meadow napkin oyster parrot quartz ribbon "
    "spider tomato valley walnut button carpet doctor farmer kitten lizard mountain pocket "
    "puzzle shadow ticket turtle village winter planet monkey bucket camera cookie dinner "
    "feather hunter marble pepper sofa"
).split()
VALUE_WORDS = (
    "north south east west red green blue black white brown happy sad quick slow hot "
    "cold early late young old bright dark soft loud sweet sour rich poor strong weak "
    "tall short wide narrow heavy light clean dirty empty full fresh stale warm cool "
    "smooth rough sharp dull wild calm brave shy proud humble gentle fierce plain fancy "
    "silent noisy dry wet"
).split()


@dataclass
class MQARSample:
    """One probe sequence.

    input_ids: ``[T]`` token ids of the whole sequence.
    answer_positions: ``[Q]`` indices ``p`` with ``input_ids[p]`` the value asked for; the
        model is scored on predicting it from the logits at ``p - 1``.
    answers: ``[Q]`` value token ids (``input_ids[answer_positions]``).
    query_keys: ``[Q]`` key token ids, in query order.
    pairs: the ``num_pairs`` (key id, value id) pairs in context order.
    gap: tokens between the last pair and the first query's key (filler included), the
        shortest key-to-query distance in the sample.
    """

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    answers: torch.Tensor
    query_keys: torch.Tensor
    pairs: list[tuple[int, int]]
    gap: int = 0


def single_token_ids(tokenizer, words) -> list[int]:
    """Ids of ``" " + word`` for the words the tokenizer encodes as one token (deduplicated)."""
    out: list[int] = []
    for w in words:
        ids = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    return out


def make_mqar_sample(
    tokenizer,
    num_pairs: int,
    num_queries: int | None = None,
    seed: int = 0,
    key_ids: list[int] | None = None,
    value_ids: list[int] | None = None,
    length: int | None = None,
) -> MQARSample:
    """Build one MQAR sequence (see the module docstring), of exactly ``length`` tokens when
    given (filler between the pairs and the queries), else as short as it gets.

    ``key_ids``/``value_ids`` default to the single-token words of ``KEY_WORDS`` and
    ``VALUE_WORDS``; keys are all distinct, values may repeat when ``num_pairs`` exceeds
    the value pool. ``num_queries`` defaults to ``num_pairs`` (every key asked once).
    """
    key_ids = list(key_ids) if key_ids is not None else single_token_ids(tokenizer, KEY_WORDS)
    value_ids = (
        list(value_ids) if value_ids is not None else single_token_ids(tokenizer, VALUE_WORDS)
    )
    num_queries = num_pairs if num_queries is None else num_queries
    _check_counts(num_pairs, num_queries, len(key_ids), len(value_ids))
    rng = random.Random(seed)
    keys = rng.sample(key_ids, num_pairs)
    pairs = list(zip(keys, [rng.choice(value_ids) for _ in keys]))
    asked = rng.sample(pairs, num_queries)
    colon, comma = _encode(tokenizer, ":"), _encode(tokenizer, ",")
    listed, _ = _pair_list(pairs, colon, comma)
    ids = special_prefix(tokenizer) + _encode(tokenizer, "Remember these pairs.") + listed
    pairs_end = len(ids)
    recall = _encode(tokenizer, ". Now recall.")
    queries, positions = _pair_list(asked, colon, comma)
    room = 0 if length is None else length - pairs_end - len(recall) - len(queries)
    if room < 0:
        raise ValueError(f"length {length} is too short for {num_pairs} MQAR pairs "
                         f"(they need {length - room} tokens)")
    filler = _encode(tokenizer, FILLER)
    ids += recall + (filler * (room // len(filler) + 1))[:room]
    offset = len(ids)
    ids += queries
    return MQARSample(
        input_ids=torch.tensor(ids),
        answer_positions=torch.tensor([offset + p for p in positions]),
        answers=torch.tensor([v for _, v in asked]),
        query_keys=torch.tensor([k for k, _ in asked]),
        pairs=pairs,
        gap=offset - pairs_end,
    )


def _check_counts(num_pairs: int, num_queries: int, num_keys: int, num_values: int) -> None:
    """Refuse pair and query counts that the key and value pools cannot serve."""
    if num_pairs < 1 or not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries}, {num_pairs}")
    if num_keys < num_pairs or not num_values:
        raise ValueError(
            f"the tokenizer has {num_keys} single-token keys and {num_values} values; "
            f"{num_pairs} pairs need that many keys (pass key_ids/value_ids)"
        )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _pair_list(pairs: list[tuple[int, int]], colon: list[int], comma: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of "k: v, k: v, ..." (no comma after the last pair) and the index of every
    value in them."""
    ids, value_at = [], []
    for i, (k, v) in enumerate(pairs):
        ids += [k] + colon
        value_at.append(len(ids))
        ids += [v] + (comma if i < len(pairs) - 1 else [])
    return ids, value_at


@torch.no_grad()
def mqar_accuracy(
    model,
    tokenizer,
    num_pairs=(4, 8, 16, 32, 64),
    num_samples: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    key_ids: list[int] | None = None,
    value_ids: list[int] | None = None,
    length: int | None = None,
) -> dict:
    """Teacher-forced recall accuracy for each number of pairs.

    ``length``: pad every sample to that many tokens with filler between pairs and queries
    (see :func:`make_mqar_sample`); None keeps them short.
    Returns ``{"num_pairs": [...], "accuracy": [% per num_pairs], "mean_accuracy": %,
    "num_samples": int, "length": length, "gaps": [shortest key-to-query tokens per
    num_pairs]}``. Samples of one setting have equal length, so they batch without padding:
    each forward is ``[batch, T] -> logits [batch, T, V]``.
    """
    device = next(model.parameters()).device
    accs, gaps = [], []
    progress = bar(total=len(num_pairs) * num_samples, desc="MQAR", unit="sample")
    for n in num_pairs:
        samples = [
            make_mqar_sample(tokenizer, n, seed=seed * 100_003 + n * 1_009 + i,
                             key_ids=key_ids, value_ids=value_ids, length=length)
            for i in range(num_samples)
        ]
        gaps.append(min(s.gap for s in samples))
        correct = total = 0
        for b in range(0, num_samples, batch_size):
            chunk = samples[b : b + batch_size]
            ids = torch.stack([s.input_ids for s in chunk]).to(device)
            logits = model(input_ids=ids).logits
            for row, s in enumerate(chunk):
                pred = logits[row, s.answer_positions.to(device) - 1].argmax(-1).cpu()
                correct += int((pred == s.answers).sum())
                total += len(s.answers)
            progress.update(len(chunk))
        accs.append(100.0 * correct / total)
    progress.close()
    return {
        "num_pairs": list(num_pairs),
        "accuracy": accs,
        "mean_accuracy": sum(accs) / len(accs),
        "num_samples": num_samples,
        "length": length,
        "gaps": gaps,
    }
