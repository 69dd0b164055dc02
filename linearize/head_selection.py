"""Which KV heads keep full attention (head-level hybrid), chosen by a measured retrieval score.

DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", arXiv 2410.10819) learns one gate per KV head that mixes full
and streaming (window + sinks) attention, on synthetic passkey-style retrieval data, with a
loss on the answer's hidden states plus an L1 push towards streaming; the heads with the
largest gates keep full attention and a full KV cache.

Here, per (layer, KV head): on synthetic passkey prompts (`linearize.eval.passkey`, the needle
beyond the window), the drop in the answer tokens' cross-entropy when that one KV head is
restored to full attention in the converted model, all other heads as converted:

    score(l, h) = CE(answer | no head full) - CE(answer | head (l, h) full)   (nats/token)

The `budget` highest-scoring heads form `LinearizeConfig.full_attention_heads`.

Where this deviates from the paper, and why:
- No optimisation. The paper trains continuous gates by gradient descent (about 2,000 steps);
  we measure each head's marginal effect, N + 1 forward passes per prompt (N = converted
  layers x KV heads). The ranking is then each head's utility alone, not jointly with others.
- The other heads are the conversion's hybrid (window + sinks + recurrence, LoLA's sparse
  cache), not pure streaming heads, so the score is what full attention adds beyond what the
  recurrence already retrieves.
- The loss is the answer tokens' cross-entropy (our passkey metric is the generated answer),
  not the paper's L2 distance between full-attention and mixed hidden states.
- Prompts: `make_passkey_sample` prompts (the eval's format, seeded apart from the eval's
  passkeys), not the paper's passkeys embedded in long-form book text.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import mixers

# Scoring prompts use passkeys seeded from here on, apart from `passkey_retrieval`'s (seed 0).
SCORING_SEED = 1009


@dataclass
class PasskeyRow:
    """A prompt and its answer: ids [1, T + A] (prompt, then the A answer tokens), answer_start = T,
    distance = tokens from the needle's end to the prompt's end."""

    ids: torch.Tensor
    answer_start: int
    distance: int


@dataclass
class HeadScores:
    """Per-(layer, KV head) scores in nats/answer token (higher: full attention helps more).

    per_head: {(layer, kv_head): CE drop}; base_loss: the answer's CE with no head full;
    kept: full_attention_heads the model already had (not scored, kept in the choice).
    """

    per_head: dict[tuple[int, int], float]
    base_loss: float
    rows: int
    answer_tokens: int
    kept: dict[int, list[int]] = field(default_factory=dict)

    def table(self) -> str:
        """One line per head, highest score first."""
        lines = ["layer  kv_head  rank  answer CE drop with this head full (nats/token)"]
        for rank, (layer, head) in enumerate(ranked_heads(self), 1):
            lines.append(f"{layer:5d}  {head:7d}  {rank:4d}  {self.per_head[(layer, head)]:.5f}")
        lines.append(f"no head full: answer CE {self.base_loss:.5f} nats/token over {self.rows} prompts "
                     f"({self.answer_tokens} answer tokens)")
        return "\n".join(lines)


def passkey_rows(tokenizer, lengths: Iterable[int], depths: Iterable[float], min_distance: int = 0,
                 seed: int = SCORING_SEED) -> list[PasskeyRow]:
    """Passkey prompts (`linearize.eval.passkey.make_passkey_sample`) with their answer
    (" " + the digits) appended. ValueError when a needle ends closer than `min_distance`
    tokens to the question (set it to the window so that retrieval needs more than the window)."""
    from .eval.passkey import make_passkey_sample

    rows = []
    for L in lengths:
        for d in depths:
            s = make_passkey_sample(tokenizer, L, d, seed=seed + L * 31 + int(d * 1000))
            if s.distance < min_distance:
                raise ValueError(f"passkey needle {s.distance} tokens from the question at length {L}, depth {d}: "
                                 f"under min_distance={min_distance}; use smaller depths or longer lengths")
            answer = tokenizer.encode(" " + s.passkey, add_special_tokens=False)
            ids = torch.cat([s.input_ids, torch.tensor(answer, dtype=torch.long)])[None]
            rows.append(PasskeyRow(ids, len(s.input_ids), s.distance))
    return rows


@contextlib.contextmanager
def full_heads_in(model: nn.Module, choice: dict[int, list[int]]):
    """Inside the block, exactly the KV heads in `choice` ({layer: [heads]}) run full attention
    in the converted layers; the model's own choice comes back afterwards."""
    found = mixers(model)
    previous = [m.full_heads for m in found]
    for m in found:
        m.full_heads = sorted(choice.get(m.layer_idx, []))
    try:
        yield model
    finally:
        for m, was in zip(found, previous):
            m.full_heads = was


def answer_loss(model: nn.Module, row: PasskeyRow) -> torch.Tensor:
    """Summed cross-entropy (fp32, nats) of the row's answer tokens given everything before them."""
    device = next(model.parameters()).device
    ids = row.ids.to(device)
    logits = model(input_ids=ids[:, :-1], use_cache=False, logits_to_keep=ids.shape[1] - row.answer_start).logits
    return F.cross_entropy(logits[0].float(), ids[0, row.answer_start:], reduction="sum")


@torch.no_grad()
def head_scores(model: nn.Module, rows: list[PasskeyRow],
                progress: Callable[[str], None] | None = None) -> HeadScores:
    """Score every KV head of every converted layer of `model` on `rows` (module docstring).
    Heads the model already keeps full stay full in every measurement and are not scored."""
    found = mixers(model)
    if not found:
        raise ValueError("the model has no converted layer: convert it first (linearize.convert)")
    if not rows:
        raise ValueError("no passkey prompt to score on: give at least one length and depth")
    kept = {m.layer_idx: list(m.full_heads) for m in found if m.full_heads}
    heads = [(m.layer_idx, h) for m in found for h in range(m.num_kv_heads) if h not in kept.get(m.layer_idx, [])]
    totals, base_total, tokens = dict.fromkeys(heads, 0.0), 0.0, 0
    for n, row in enumerate(rows, 1):
        with full_heads_in(model, kept):
            base = answer_loss(model, row).item()
        for layer, head in heads:
            with full_heads_in(model, {**kept, layer: kept.get(layer, []) + [head]}):
                totals[(layer, head)] += base - answer_loss(model, row).item()
        base_total += base
        tokens += row.ids.shape[1] - row.answer_start
        if progress is not None:
            progress(f"prompt {n}/{len(rows)}: {row.answer_start} tokens, needle {row.distance} tokens back, "
                     f"answer CE {base / (row.ids.shape[1] - row.answer_start):.4f} nats/token")
    return HeadScores({h: v / tokens for h, v in totals.items()}, base_total / tokens, len(rows), tokens, kept)


def ranked_heads(scores: HeadScores | dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """(layer, KV head) pairs, highest score first (ties: lower layer, then lower head first)."""
    per_head = scores.per_head if isinstance(scores, HeadScores) else scores
    return sorted(per_head, key=lambda lh: (-per_head[lh], lh))


def select_full_heads(scores: HeadScores | dict[tuple[int, int], float], budget: int) -> dict[int, list[int]]:
    """The `budget` highest-scoring KV heads plus those already kept, as the
    `LinearizeConfig.full_attention_heads` value {layer: sorted heads}."""
    per_head = scores.per_head if isinstance(scores, HeadScores) else scores
    kept = scores.kept if isinstance(scores, HeadScores) else {}
    n = len(per_head)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an integer from 1 to {n} (KV heads to keep full among the {n} scored), "
                         f"got {budget!r}")
    choice = {layer: set(heads) for layer, heads in kept.items()}
    for layer, head in ranked_heads(per_head)[:budget]:
        choice.setdefault(layer, set()).add(head)
    return {layer: sorted(heads) for layer, heads in sorted(choice.items())}


def heads_argument(choice: dict[int, list[int]]) -> str:
    """The `--full-attention-heads` value for a choice: "layer:head,..." (e.g. "3:0,7:1,7:2")."""
    return ",".join(f"{layer}:{head}" for layer, heads in sorted(choice.items()) for head in heads)
