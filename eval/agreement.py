"""Agreement between a student and its teacher on held-out text: top-1 match and KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import linearize

from .progress import bar


@torch.no_grad()
def teacher_agreement(
    student,
    teacher,
    tokenizer,
    texts: list[str],
    max_length: int = 512,
    batch_size: int = 4,
    bin_size: int = 64,
) -> dict:
    """Next-token agreement of ``student`` with ``teacher`` at every position of ``texts``.

    ``teacher=None`` scores the student against its own original model (softmax attention,
    LoRA adapters off: :func:`linearize.teacher`), with no second copy of the weights. Each text is
    truncated to ``max_length`` tokens; batches are right-padded ``[batch, <= max_length]``
    and only real positions count. Per position ``t``: match = ``argmax p_s == argmax p_t``,
    KL = ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` in nats (teacher as reference).

    Returns ``{"top1_agreement" (%), "kl_mean" (nats/token), "tokens", "texts",
    "bin_size", "agreement_by_position" (%, per bin of positions), "kl_by_position"}``.
    """
    device = next(student.parameters()).device
    encoded = [tokenizer(t, return_tensors=None)["input_ids"][:max_length] for t in texts]
    encoded = sorted((e for e in encoded if e), key=len)
    nbins = (max((len(e) for e in encoded), default=0) + bin_size - 1) // bin_size
    match_bins = torch.zeros(nbins, dtype=torch.float64)
    kl_bins = torch.zeros(nbins, dtype=torch.float64)
    count_bins = torch.zeros(nbins, dtype=torch.float64)
    for b in bar(range(0, len(encoded), batch_size), desc="agreement", unit="batch"):
        ids, mask = _right_padded(encoded[b : b + batch_size], device)
        match, kl = _match_and_kl(student, teacher, ids, mask)
        valid = mask.bool()
        pos_bin = (torch.arange(ids.shape[1], device=device) // bin_size).expand_as(ids)[valid].cpu()
        match_bins.index_add_(0, pos_bin, match[valid].cpu())
        kl_bins.index_add_(0, pos_bin, kl[valid].double().cpu())
        count_bins.index_add_(0, pos_bin, torch.ones_like(pos_bin, dtype=torch.float64))
    return _summary(match_bins, kl_bins, count_bins, len(encoded), bin_size)


def _right_padded(chunk: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of texts sorted by length, right-padded with 0 to the last (longest):
    ids and attention mask [batch, width] (long), on `device`."""
    width = len(chunk[-1])
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for row, e in enumerate(chunk):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    return ids.to(device), mask.to(device)


def _match_and_kl(student, teacher, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of ids [batch, width]: top-1 match of student and teacher (1.0 or 0.0, fp64)
    and KL(teacher || student) in nats (fp32), both [batch, width]; teacher None is the
    student's own original model."""
    if teacher is None:
        with linearize.teacher(student):
            t_logits = student(input_ids=ids, attention_mask=mask).logits
    else:
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    t_logp = F.log_softmax(t_logits.float(), -1)
    s_logp = F.log_softmax(s_logits.float(), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).clamp_min(0.0)
    match = (t_logp.argmax(-1) == s_logp.argmax(-1)).double()
    return match, kl


def _summary(match_bins, kl_bins, count_bins, texts: int, bin_size: int) -> dict:
    """`teacher_agreement`'s result from the per-bin sums of matches, KL and tokens [nbins]."""
    tokens = int(count_bins.sum())
    if tokens == 0:
        raise ValueError("no tokens to compare: all texts are empty")
    nonzero = count_bins.clamp_min(1)
    return {
        "top1_agreement": 100.0 * float(match_bins.sum()) / tokens,
        "kl_mean": float(kl_bins.sum()) / tokens,
        "tokens": tokens,
        "texts": texts,
        "bin_size": bin_size,
        "agreement_by_position": (100.0 * match_bins / nonzero).tolist(),
        "kl_by_position": (kl_bins / nonzero).tolist(),
    }
