"""Which layers keep softmax attention, chosen by measured KL to the teacher.

KL-guided layer selection (GA-S2; "Distilling to Hybrid Attention Models via KL-Guided Layer
Selection", ICLR 2026, official code fla-org/hybrid-distillation): in an otherwise all-linear
student, restore softmax attention in exactly one layer, distill, and rank the layers by the
distillation loss reached, forward KL(teacher || student) per token (fla's fused KL,
sum_v p_t (log p_t - log p_s)); the top-K layers keep softmax in the final hybrid.

Where this deviates, and why:
- No training per candidate. The paper runs a stage-2 distillation (~200M tokens) for every
  layer and ranks by its logged loss; that is N trainings. We measure the KL of the student as
  it stands (untrained, or a saved stage-1 model, which is the paper's starting point) with
  one layer's softmax restored: N + 2 forward passes per text. The ranking is then the layers'
  marginal utility before training, not after it.
- Score as a gain. `restore` reports KL(all linear) - KL(all linear, layer i softmax), the KL
  that restoring layer i recovers (nats/token); ranking by it is ranking by the paper's loss
  (lowest loss first), and a layer whose student already equals the teacher scores 0.
- `single` (not in the paper; the issue's "one layer at a time linearized") reports KL with
  only layer i linearized and every other layer softmax: the layer's cost in isolation.
- Data: held-out text at the caller's length instead of the paper's 4,096-token training rows.
- Layers the model already keeps as softmax (`LinearizeConfig.softmax_layers`) stay softmax
  and are not scored; the choice adds to them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import mixers, teacher
from .state import linearize_state

SCORES = ("restore", "single")


@dataclass
class LayerScores:
    """Per-layer scores in nats/token (higher: keeping the layer as softmax matters more).

    score: `restore` or `single` (module docstring). per_layer: {layer index: nats/token}.
    all_linear_kl: KL(teacher || student) with every scored layer linearized, nats/token.
    kept: layers the model already keeps as softmax (not scored). tokens: positions averaged.
    """

    score: str
    per_layer: dict[int, float]
    all_linear_kl: float
    kept: list[int] = field(default_factory=list)
    tokens: int = 0

    def table(self) -> str:
        """One line per layer, highest score first, with its rank."""
        what = "KL recovered by softmax here" if self.score == "restore" else "KL with only this layer linear"
        lines = [f"layer  rank  {what} (nats/token)"]
        for rank, layer in enumerate(ranked_layers(self), 1):
            lines.append(f"{layer:5d}  {rank:4d}  {self.per_layer[layer]:.5f}")
        lines.append(f"all scored layers linear: KL {self.all_linear_kl:.5f} nats/token over {self.tokens} tokens")
        return "\n".join(lines)


def token_rows(tokenizer, texts: Iterable[str], max_length: int) -> list[torch.Tensor]:
    """Each text's first `max_length` tokens as a LongTensor [1, T] (texts under 2 tokens dropped)."""
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_length]
        if ids.shape[1] >= 2:
            rows.append(ids)
    return rows


@contextlib.contextmanager
def softmax_in(model: nn.Module, layers: Iterable[int]):
    """Inside the block, the converted `layers` run their original softmax attention; the
    other converted layers run their student."""
    chosen = set(layers)
    found = mixers(model)
    previous = [m.teacher_active for m in found]
    for m in found:
        m.teacher_active = m.layer_idx in chosen
    try:
        yield model
    finally:
        for m, was in zip(found, previous):
            m.teacher_active = was


def kl_per_token(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) at each position: the teacher's log-probabilities and the
    student's logits [B, T, V] -> [B, T] (fp32, nats)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1)


@torch.no_grad()
def layer_scores(model: nn.Module, rows: Iterable[torch.Tensor], score: str = "restore",
                 progress: Callable[[str], None] | None = None) -> LayerScores:
    """Score every converted layer of `model` on `rows` (LongTensors [B, T], no padding).

    score `restore`: KL(all linear) - KL(all linear but layer i); `single`: KL with only layer
    i linearized. Both forward KL(teacher || student), averaged over every position, nats/token.
    `progress(line)` is called once per row.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    st = linearize_state(model)
    layers = [m.layer_idx for m in mixers(model)]
    if len(layers) < 2:
        raise ValueError(f"the model has {len(layers)} converted layer(s): selection needs at least 2 to choose among")
    device = next(model.parameters()).device
    totals, all_linear, tokens = dict.fromkeys(layers, 0.0), 0.0, 0
    for n, ids in enumerate(rows, 1):
        ids = ids.to(device)

        def kl(softmax_layers) -> float:
            with softmax_in(model, softmax_layers):
                return kl_per_token(ref, model(input_ids=ids, use_cache=False).logits).sum().item()

        with teacher(model):
            ref = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        base = kl([])
        all_linear += base
        for i in layers:
            totals[i] += base - kl([i]) if score == "restore" else kl([j for j in layers if j != i])
        tokens += ids.numel()
        if progress is not None:
            progress(f"row {n}: {ids.shape[1]} tokens, all-linear KL {base / ids.numel():.4f} nats/token")
    if tokens == 0:
        raise ValueError("no text to score on: every row was empty (give texts of at least 2 tokens)")
    per_layer = {i: v / tokens for i, v in totals.items()}
    return LayerScores(score, per_layer, all_linear / tokens, list(st.config.softmax_layers), tokens)


def ranked_layers(scores: LayerScores | dict[int, float]) -> list[int]:
    """Layer indices, highest score first (ties: lower index first)."""
    per_layer = scores.per_layer if isinstance(scores, LayerScores) else scores
    return sorted(per_layer, key=lambda i: (-per_layer[i], i))


def select_softmax_layers(scores: LayerScores | dict[int, float], budget: int) -> list[int]:
    """The `budget` highest-scoring layers plus those already kept, sorted: the
    `LinearizeConfig.softmax_layers` to convert with. budget must leave a layer linearized."""
    per_layer = scores.per_layer if isinstance(scores, LayerScores) else scores
    kept = scores.kept if isinstance(scores, LayerScores) else []
    n = len(per_layer)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget < n:
        raise ValueError(f"budget must be an integer from 1 to {n - 1} (softmax layers to keep among the {n} scored "
                         f"ones, leaving at least one linearized), got {budget!r}")
    return sorted(set(kept) | set(ranked_layers(per_layer)[:budget]))
