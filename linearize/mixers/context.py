"""Per-forward facts every mixer needs but the decoder layer does not pass on.

transformers hands attention modules a 4-D mask built for softmax attention (or None); the
mixers need the 2-D padding mask and, for packed batches, the sequence starts. A forward
pre-hook on the decoder stack records them here once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.rope import rope_halves


@dataclass
class ForwardContext:
    attention_mask: torch.Tensor | None = None  # [B, past + T], 1 = real token
    position_ids: torch.Tensor | None = None  # [B, T]
    _memo: dict = field(default_factory=dict)  # per-forward results, shared by every layer

    def record(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if (mask is not None and mask.dim() == 2) else None
        self.position_ids = kwargs.get("position_ids")
        self._memo.clear()

    def key_mask(self, T: int) -> torch.Tensor | None:
        """[B, T] bool validity of the current T tokens, or None when nothing is padded."""
        key = ("key_mask", T)
        if key not in self._memo:
            self._memo[key] = self._key_mask(T)
        return self._memo[key]

    def cu_seqlens(self, B: int, T: int) -> torch.LongTensor | None:
        """Packed-sequence bounds [N + 1] when a single row's position_ids restart at 0."""
        key = ("cu_seqlens", B, T)
        if key not in self._memo:
            self._memo[key] = self._cu_seqlens(B, T)
        return self._memo[key]

    def rope_halves(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`kernels.rope.rope_halves` of a rotation cos, sin [B, T, D], computed and checked once
        per forward for every layer that is handed the same rotation."""
        memo = self._memo.setdefault("rope_halves", [])
        for seen, halves in memo:
            if seen is cos:
                return halves
        halves = rope_halves(cos, sin)
        memo.append((cos, halves))
        return halves

    def _key_mask(self, T: int) -> torch.Tensor | None:
        mask = self.attention_mask
        if mask is None:
            return None
        mask = mask[:, -T:].bool()
        return None if bool(mask.all()) else mask

    def _cu_seqlens(self, B: int, T: int) -> torch.LongTensor | None:
        pos = self.position_ids
        if pos is None or B != 1 or pos.shape[-1] != T or T < 2:
            return None
        starts = (pos[0, 1:] == 0).nonzero().flatten() + 1
        if starts.numel() == 0:
            return None
        bounds = torch.cat([starts.new_zeros(1), starts, starts.new_tensor([T])])
        return bounds.long()
