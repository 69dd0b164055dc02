"""Held-out perplexity with sliding windows and exact token accounting, and the per-position
next-token NLL that the long-document metric buckets by position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .progress import bar


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n`` tokens as ``(start, end, first_target)``.

    The model sees ``ids[start:end]`` (at most ``max_length`` tokens) and is scored on the
    tokens ``ids[first_target:end]``. Every token but the first is scored exactly once, and
    always with at least ``max_length - stride`` tokens of context inside its window (the
    first window aside).
    """
    if not 1 <= stride < max_length:
        raise ValueError(
            f"need 1 <= stride < max_length (got stride={stride}, max_length={max_length}): "
            "each window must overlap the previous one by a token to score its first target"
        )
    if n < 2:
        return []
    end = min(n, max_length)
    windows = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        windows.append((max(0, new_end - max_length), new_end, end))
        end = new_end
    return windows


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL (nats) of every position, from one forward.

    input_ids, attention_mask, labels: ``[B, T]`` (labels default to ``input_ids``; -100
    marks a target that is not scored). Returns ``[B, T - 1]`` float32 where entry ``t`` is
    the NLL of target ``labels[:, t + 1]`` given tokens ``<= t`` (0 where not scored).
    """
    labels = input_ids if labels is None else labels
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100, reduction="none")
    return nll.view(targets.shape)


DEFAULT_BUCKET_EDGES = (0, 64, 512, 2048, 4096)


def bucket_table(nll_sums: list[float], counts: list[int], edges) -> list[dict]:
    """``[{"start", "end", "tokens", "mean_nll", "perplexity"}]`` per bucket ``[start, end)``
    (mean and perplexity None for an empty bucket)."""
    rows = []
    for (lo, hi), total, n in zip(zip(edges[:-1], edges[1:]), nll_sums, counts):
        mean = total / n if n else None
        rows.append({"start": lo, "end": hi, "tokens": n, "mean_nll": mean,
                     "perplexity": math.exp(mean) if n else None})
    return rows


def bucket_sums(nll: torch.Tensor, edges) -> tuple[list[float], list[int]]:
    """Sum and count of next-token NLLs per target-position bucket.

    nll: ``[T - 1]`` from :func:`token_nll` for one sequence; entry ``t`` scores the token at
    position ``t + 1``, so bucket ``[start, end)`` holds targets ``start <= t + 1 < end``.
    """
    if any(b <= a for a, b in zip(edges[:-1], edges[1:])) or len(edges) < 2:
        raise ValueError(f"bucket edges must be at least two increasing positions, got {list(edges)}")
    positions = torch.arange(1, nll.shape[0] + 1)
    sums, counts = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (positions >= lo) & (positions < hi)
        sums.append(float(nll[sel].double().sum()))
        counts.append(int(sel.sum()))
    return sums, counts


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str],
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 4,
) -> dict:
    """Token-level perplexity of ``model`` over ``texts``.

    Each text is tokenized on its own (with the tokenizer's special tokens) and cut into
    :func:`sliding_windows`; windows are right-padded into ``[batch, <= max_length]``
    batches. The result is ``exp(sum NLL / tokens)`` where ``tokens = sum(len(ids) - 1)``.

    Returns ``{"perplexity", "mean_nll" (nats/token), "tokens", "texts", "max_length",
    "stride"}``.
    """
    device = next(model.parameters()).device
    jobs = []
    for text in texts:
        ids = tokenizer(text, return_tensors=None)["input_ids"]
        for start, end, first in sliding_windows(len(ids), max_length, stride):
            jobs.append((ids[start:end], first - start))
    jobs.sort(key=lambda j: len(j[0]))
    total_nll, total_tokens = 0.0, 0
    for b in bar(range(0, len(jobs), batch_size), desc="perplexity", unit="batch"):
        chunk = jobs[b : b + batch_size]
        width = max(len(w) for w, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (w, skip) in enumerate(chunk):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
            labels[row, skip : len(w)] = torch.tensor(w[skip:])
        nll = token_nll(model, ids.to(device), mask.to(device), labels.to(device))
        total_nll += float(nll.sum())
        total_tokens += int((labels[:, 1:] != -100).sum())
    if total_tokens == 0:
        raise ValueError("no tokens to score: every text has fewer than two tokens")
    mean = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens": total_tokens,
        "texts": len(texts),
        "max_length": max_length,
        "stride": stride,
    }
