"""Passkey retrieval: a number hidden at a chosen depth of filler text, read back greedily.

The prompt follows the common long-context probe (Landmark Attention, LongLoRA): a task
preamble, repeated filler sentences with the passkey sentence inserted after a fraction
``depth`` of them, then the question. Lengths are in tokens of the given tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .progress import bar

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PasskeySample:
    """One prompt.

    input_ids: ``[T]`` token ids, ``T <= length``.
    passkey: the digits to retrieve.
    depth: the requested depth; ``needle_start``/``needle_end`` delimit the needle's token
        span in ``input_ids`` and ``filler_before``/``filler_total`` count filler blocks.
    """

    input_ids: torch.Tensor
    passkey: str
    depth: float
    length: int
    needle_start: int
    needle_end: int
    filler_before: int
    filler_total: int

    @property
    def distance(self) -> int:
        """Tokens from the needle's end to the prompt's end, where the answer is generated: a
        sliding-window model sees the needle only when its window is longer than this."""
        return len(self.input_ids) - self.needle_end


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by itself (e.g. ``[bos]``, or ``[]``)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    i = len(full) - len(plain)
    return full[:i] if i > 0 and full[i:] == plain else []


def make_passkey_sample(
    tokenizer, length: int, depth: float, passkey: str | int | None = None, seed: int = 0
) -> PasskeySample:
    """Build a prompt of at most ``length`` tokens with the needle after ``round(depth * F)``
    of its ``F`` filler blocks (``depth`` 0 = right after the preamble, 1 = just before the
    question). The passkey defaults to a seeded random 5-digit number.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(passkey) if passkey is not None else str(random.Random(seed).randint(10000, 99999))
    if not key.isdigit():
        raise ValueError(f"passkey must be digits, got {key!r}")

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head = special_prefix(tokenizer) + enc(PREAMBLE)
    filler, needle, question = enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"length {length} is too short for the passkey prompt")
    total = room // len(filler)
    before = round(depth * total)
    ids = head + filler * before
    start = len(ids)
    ids += needle
    end = len(ids)
    ids += filler * (total - before) + question
    return PasskeySample(
        input_ids=torch.tensor(ids),
        passkey=key,
        depth=depth,
        length=length,
        needle_start=start,
        needle_end=end,
        filler_before=before,
        filler_total=total,
    )


@torch.no_grad()
def greedy_continue(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation through ``model.generate`` (the model's own cache).

    input_ids: ``[T]``. Returns the ``[<= max_new_tokens]`` new token ids.
    """
    device = next(model.parameters()).device
    ids = input_ids.unsqueeze(0).to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    return out[0, ids.shape[1] :].cpu()


def passkey_retrieval(
    model,
    tokenizer,
    lengths=DEFAULT_LENGTHS,
    depths=DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    min_distance: int = 0,
) -> dict:
    """Greedy passkey accuracy for every (length, depth).

    A trial passes when the first number in the decoded continuation equals the passkey.
    ``min_distance`` > 0 demands that every needle ends at least that many tokens before the
    prompt's end (:attr:`PasskeySample.distance`), e.g. beyond a linearized model's window;
    a (length, depth) that places it closer raises ``ValueError`` before anything runs.
    Returns ``{"lengths", "depths", "accuracy": [len(lengths)][len(depths)] in %,
    "distances": [len(lengths)][len(depths)] tokens, "mean_accuracy": %, "trials": int,
    "outputs": [{length, depth, passkey, distance, output}]}``.
    """
    samples = {
        (L, d, t): make_passkey_sample(tokenizer, L, d, seed=seed * 7919 + L * 31 + int(d * 1000) + t)
        for L in lengths for d in depths for t in range(trials)
    }
    close = sorted({(L, d, s.distance) for (L, d, _), s in samples.items() if s.distance < min_distance})
    if close:
        raise ValueError(
            f"passkey needle closer than min_distance={min_distance} tokens to the question at "
            + ", ".join(f"length {L} depth {d} ({n} tokens)" for L, d, n in close)
            + ": use smaller depths or longer lengths")
    grid, outputs = [], []
    progress = bar(total=len(samples), desc="passkey", unit="prompt")
    for L in lengths:
        row = []
        for d in depths:
            hits = 0
            for t in range(trials):
                s = samples[(L, d, t)]
                new = greedy_continue(model, s.input_ids, max_new_tokens=len(s.passkey) + 4)
                text = tokenizer.decode(new, skip_special_tokens=True)
                m = re.search(r"\d+", text)
                hits += bool(m and m.group(0) == s.passkey)
                outputs.append({"length": L, "depth": d, "passkey": s.passkey, "distance": s.distance,
                                "output": text})
                progress.update(1)
            row.append(100.0 * hits / trials)
        grid.append(row)
    progress.close()
    flat = [a for r in grid for a in r]
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": grid,
        "distances": [[samples[(L, d, 0)].distance for d in depths] for L in lengths] if trials else [],
        "mean_accuracy": sum(flat) / len(flat),
        "trials": trials,
        "outputs": outputs,
    }
