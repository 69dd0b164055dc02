"""Shape checks and small helpers shared by every kernel implementation."""
from __future__ import annotations

import torch


def tracks_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd records an op on these tensors: grad mode is on and one requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sequence_spans(B: int, T: int, cu_seqlens: torch.LongTensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) for every sequence: B rows of length T, or packed sequences."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def check_cu_seqlens(B: int, T: int, cu_seqlens: torch.LongTensor | None) -> None:
    if cu_seqlens is None:
        return
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: expected batch size 1, got {B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] starting at 0")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {c}")


def num_sequences(B: int, cu_seqlens: torch.LongTensor | None) -> int:
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def check_gla_inputs(q, k, v, g, initial_state, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D] tensors")
    B, T, H, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[-1] != K:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    HKV = k.shape[2]
    if v.shape[2] != HKV or H % HKV != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HKV})")
    if g.shape not in ((B, T, HKV, K), (B, T, HKV)):
        raise ValueError(f"g must be [B, T, HKV, K] or [B, T, HKV], got {tuple(g.shape)}")
    check_cu_seqlens(B, T, cu_seqlens)
    if initial_state is not None:
        want = (num_sequences(B, cu_seqlens), HKV, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be {want}, got {tuple(initial_state.shape)}")


def check_window_inputs(q, k, v, window, num_sink_tokens, sink_logits, key_mask, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D] tensors")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[2]})")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None (full causal), got {window!r}")
    if num_sink_tokens < 0:
        raise ValueError(f"num_sink_tokens must be >= 0, got {num_sink_tokens}")
    if sink_logits is not None and (sink_logits.dim() not in (1, 2) or sink_logits.shape[0] != H):
        raise ValueError(f"sink_logits must be [H] or [H, M] with H={H}, got {tuple(sink_logits.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"key_mask must be [B, T] = {(B, T)}, got {tuple(key_mask.shape)}")
    check_cu_seqlens(B, T, cu_seqlens)
    if cu_seqlens is not None and key_mask is not None:
        raise ValueError("use either cu_seqlens (packed) or key_mask (padded), not both")


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's attention logit soft-cap c * tanh(s / c) on scaled scores (any shape);
    None returns `scores` itself. Differentiable through tanh."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
