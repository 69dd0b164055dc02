"""Decode state for a linearized model, as one transformers `Cache`.

Per linearized layer (`LinearizedLayerCache`): the fp32 recurrent state (+ normalizer) per
KV head, the sink tokens' keys/values and the last `window - 1` post-RoPE keys/values of the
window branch, with validity flags so padded positions never count. Per softmax-kept layer:
an ordinary `DynamicLayer`. Memory of a linearized layer does not grow with the context.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .kernels.utils import soft_cap
from .state import linearize_state


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


# New queries per block when a chunk meets a cached window (bounds the score matrix).
QUERY_BLOCK = 256


class LinearizedLayerCache(CacheLayerMixin):
    """Constant-size state of one linearized layer (batch-first, `[B, L, HKV, D]` layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int = 0, num_sink_tokens: int = 0):
        super().__init__()
        self.window = window
        self.num_sink_tokens = num_sink_tokens
        self.seen = 0
        self.recurrent: torch.Tensor | None = None
        self.valid_seen: torch.Tensor | None = None  # [B] real tokens seen so far
        self.sink_k = self.sink_v = self.sink_valid = None  # [B, S, HKV, D], [B, S]
        self.win_k = self.win_v = self.win_valid = self.win_sink = None  # [B, L, HKV, D], [B, L]
        # LoLCATs: the last `window` feature-mapped keys [B, W, Hs, F] and values that enter the
        # recurrent state once they leave the window, and whether each may ([B, W] bool).
        self.tail_k = self.tail_v = self.tail_keep = None
        # LoLA's sparse cache (`linearize.kernels.hybrid.sparse_cache`): its tensors by name.
        self.sparse: dict[str, torch.Tensor] | None = None
        self.is_initialized = True

    # -- transformers Cache protocol --------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a linearized layer keeps a recurrent state, not a KV cache: it was called as softmax "
                        "attention. Run the teacher with `linearize.teacher(model)` and a fresh cache.")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> list[str]:
        return ["recurrent", "valid_seen", "sink_k", "sink_v", "sink_valid", "win_k", "win_v", "win_valid", "win_sink",
                "tail_k", "tail_v", "tail_keep"]

    def _map(self, fn) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.sparse is not None:
            self.sparse = {name: fn(t) for name, t in self.sparse.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.seen = 0
        self.sparse = None
        for name in self._tensors():
            setattr(self, name, None)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("a recurrent state cannot be rolled back: cropping is not supported for linearized layers")

    def nbytes(self) -> int:
        tensors = [getattr(self, n) for n in self._tensors() if getattr(self, n) is not None]
        tensors += list((self.sparse or {}).values())
        return sum(t.nelement() * t.element_size() for t in tensors)

    # -- used by the mixers -----------------------------------------------------------------
    def has_window_past(self) -> bool:
        return self.win_k is not None or self.sink_k is not None

    def advance(self, T: int, key_mask: torch.Tensor | None) -> None:
        self.seen += T

    @property
    def linear_tail(self):
        """([keys, values], keep) of the last `window` steps not yet in the state, or None."""
        return None if self.tail_k is None else ([self.tail_k, self.tail_v], self.tail_keep)

    @linear_tail.setter
    def linear_tail(self, tail) -> None:
        (self.tail_k, self.tail_v), self.tail_keep = tail

    def _new_ranks(self, B: int, T: int, key_mask: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
        if self.valid_seen is None:
            self.valid_seen = torch.zeros(B, dtype=torch.long, device=device)
        rank = self.valid_seen[:, None] + valid.long().cumsum(-1) - 1
        return valid, rank

    def store_window(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, *, window: int,
                     num_sink_tokens: int) -> None:
        """Append new post-RoPE keys/values [B, T, HKV, D]: sinks kept apart, the window trimmed."""
        B, T = k.shape[:2]
        valid, rank = self._new_ranks(B, T, key_mask, k.device)
        is_sink = valid & (rank < num_sink_tokens)
        if num_sink_tokens > 0:
            if self.sink_k is None:
                self.sink_k = k.new_zeros(B, num_sink_tokens, *k.shape[2:])
                self.sink_v = v.new_zeros(B, num_sink_tokens, *v.shape[2:])
                self.sink_valid = torch.zeros(B, num_sink_tokens, dtype=torch.bool, device=k.device)
            b_idx, t_idx = is_sink.nonzero(as_tuple=True)
            if b_idx.numel():
                slot = rank[b_idx, t_idx]
                self.sink_k[b_idx, slot] = k[b_idx, t_idx].to(self.sink_k.dtype)
                self.sink_v[b_idx, slot] = v[b_idx, t_idx].to(self.sink_v.dtype)
                self.sink_valid[b_idx, slot] = True
        keep = max(window - 1, 0)
        self.win_k = _cat(self.win_k, k)[:, -keep:] if keep else k[:, :0]
        self.win_v = _cat(self.win_v, v)[:, -keep:] if keep else v[:, :0]
        self.win_valid = _cat(self.win_valid, valid)[:, -keep:] if keep else valid[:, :0]
        self.win_sink = _cat(self.win_sink, is_sink)[:, -keep:] if keep else is_sink[:, :0]
        self.valid_seen = self.valid_seen + valid.long().sum(-1)

    def window_attention(self, q, k, v, key_mask, *, window: int, num_sink_tokens: int, sink_logits, scale: float,
                         softcap: float | None = None):
        """Softmax of new queries [B, T, H, D] over sinks, the cached window and the new keys.

        Queries go in blocks of `QUERY_BLOCK`: a block sees the sinks, the cached window and
        only the new keys within `window` of it (plus new sink tokens), so a long chunk costs
        O(T * (window + block)), not O(T^2). Returns o [B, T, H, D], lse [B, T, H] (fp32) and
        each row's largest score m [B, T, H] (fp32, sink logits excluded), then stores the new
        keys/values. softcap: scores capped to c * tanh(s / c) before the softmax (Gemma-2).
        """
        B, T = q.shape[:2]
        if T == 1 and key_mask is None and (num_sink_tokens == 0 or self.valid_seen is not None and bool(
                (self.valid_seen >= num_sink_tokens).all())):
            out = self._attend_one(q, k, v, sink_logits, scale, softcap)
            self.store_window(k, v, None, window=window, num_sink_tokens=num_sink_tokens)
            return out
        valid, rank = self._new_ranks(B, T, key_mask, k.device)
        new_sink = valid & (rank < num_sink_tokens)
        sink_end = int(new_sink.any(0).nonzero().max()) + 1 if bool(new_sink.any()) else 0
        blocks = []
        for t0 in range(0, T, QUERY_BLOCK):
            t1 = min(T, t0 + QUERY_BLOCK)
            lo = max(0, t0 - window + 1)
            cols = torch.cat([torch.arange(min(sink_end, lo), device=q.device), torch.arange(lo, t1, device=q.device)])
            blocks.append(self._attend(q[:, t0:t1], torch.arange(t0, t1, device=q.device), cols, k, v, valid, new_sink,
                                       window, sink_logits, scale, softcap))
        self.store_window(k, v, key_mask, window=window, num_sink_tokens=num_sink_tokens)
        return tuple(torch.cat(parts, dim=1) for parts in zip(*blocks))

    def _has_window_keys(self) -> bool:
        return self.win_k is not None and self.win_k.shape[1] > 0

    def _cached_keys(self) -> tuple[list, list, list]:
        """Keys and values [B, S, HKV, D] of the sinks, then the cached window, and which of them
        a query may see ([B, S] bool: valid, and window entries that are not also sinks)."""
        keys, values, masks = [], [], []
        if self.sink_k is not None:
            keys.append(self.sink_k)
            values.append(self.sink_v)
            masks.append(self.sink_valid)
        if self._has_window_keys():
            keys.append(self.win_k)
            values.append(self.win_v)
            masks.append(self.win_valid & ~self.win_sink)
        return keys, values, masks

    def _attend_one(self, q, k, v, sink_logits, scale, softcap=None):
        """One new, valid, non-sink token (the decode step): q [B, 1, H, D] against the sinks, the
        cached window (all within reach of it) and its own key, in a handful of ops. Returns o
        [B, 1, H, Dv] (q's dtype), lse and the row max [B, 1, H] fp32."""
        B, _, H, D = q.shape
        HKV = k.shape[2]
        G = H // HKV
        keys, values, masks = self._cached_keys()
        keys.append(k)
        values.append(v)
        masks.append(torch.ones(B, 1, dtype=torch.bool, device=q.device))
        K = torch.cat(keys, dim=1).float().permute(0, 2, 3, 1)  # [B, HKV, D, N]
        V = torch.cat(values, dim=1).float().transpose(1, 2)  # [B, HKV, N, Dv]
        N = V.shape[2]
        scores = soft_cap(torch.matmul(q.float().view(B, HKV, G, D), K).mul_(scale), softcap)  # [B, HKV, G, N]
        scores.masked_fill_(~torch.cat(masks, dim=1)[:, None, None, :], float("-inf"))
        row_max = scores.amax(-1)
        if sink_logits is not None:
            extra = sink_logits.float().reshape(HKV, G, -1)[None].expand(B, HKV, G, -1)
            scores = torch.cat([scores, extra], dim=-1)
        lse = torch.logsumexp(scores, dim=-1)  # finite: the token's own key is always allowed
        probs = scores.sub_(lse.unsqueeze(-1)).exp_()[..., :N]
        o = torch.matmul(probs, V)  # [B, HKV, G, Dv]
        return o.reshape(B, 1, H, -1).to(q.dtype), lse.reshape(B, 1, H), row_max.reshape(B, 1, H)

    def _attend(self, q, rows, cols, k, v, valid, new_sink, window, sink_logits, scale, softcap=None):
        """Queries q [B, R, H, D] at new positions `rows` against the sinks, the cached window and
        the new keys at positions `cols`; returns o [B, R, H, Dv] (q's dtype), lse and the row max
        [B, R, H] fp32."""
        B, R, H, D = q.shape
        HKV = k.shape[2]
        k, v, valid, new_sink = k[:, cols], v[:, cols], valid[:, cols], new_sink[:, cols]
        new_allowed = valid[:, None, :] & (cols[None, None, :] <= rows[None, :, None]) & (
            ((rows[:, None] - cols[None, :]) < window)[None] | new_sink[:, None, :])
        keys, values, cached = self._cached_keys()
        masks = [m[:, None, :].expand(B, R, -1) for m in cached]
        if self._has_window_keys():
            L = self.win_k.shape[1]
            dist = (L - torch.arange(L, device=q.device))[None, :] + rows[:, None]  # [R, L]
            masks[-1] = masks[-1] & (dist < window)[None]
        keys.append(k)
        values.append(v)
        masks.append(new_allowed)
        K = torch.cat([x.to(q.dtype) for x in keys], dim=1).float()
        V = torch.cat([x.to(v.dtype) for x in values], dim=1).float()
        allowed = torch.cat(masks, dim=-1)  # [B, R, S]
        G = H // HKV
        scores = soft_cap(torch.einsum("bthgd,bshd->bhgts", q.float().view(B, R, HKV, G, D), K) * scale, softcap)
        scores = scores.reshape(B, H, R, -1).masked_fill(~allowed[:, None], float("-inf"))
        row_max = scores.amax(-1)  # [B, H, R]
        if sink_logits is not None:
            extra = sink_logits.float().reshape(H, -1)[None, :, None, :].expand(B, H, R, -1)
            scores = torch.cat([scores, extra], dim=-1)
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, R]
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)[..., : K.shape[1]]
        o = torch.einsum("bhgts,bshd->bthgd", probs.view(B, HKV, G, R, -1), V).reshape(B, R, H, -1)
        return o.to(q.dtype), lse.transpose(1, 2), row_max.transpose(1, 2)


class LinearizeCache(Cache):
    """The whole model's decode state: `LinearizedLayerCache` for converted layers and
    `DynamicLayer` for layers that kept softmax attention. Pass it to `model(...)` or let
    `model.generate()` create it."""

    def __init__(self, model=None, *, num_layers: int | None = None, layer_specs: dict | None = None):
        if model is not None:
            st = linearize_state(model)
            num_layers = st.num_layers
            layer_specs = {i: (st.config.window if st.config.mixing != "linear-only" else 0, st.config.num_sink_tokens)
                           for i in st.layers}
        if num_layers is None or layer_specs is None:
            raise ValueError("LinearizeCache needs a linearized model (or num_layers and layer_specs)")
        layers = [LinearizedLayerCache(*layer_specs[i]) if i in layer_specs else DynamicLayer()
                  for i in range(num_layers)]
        super().__init__(layers=layers)

    def linear_layer(self, layer_idx: int) -> LinearizedLayerCache:
        layer = self.layers[layer_idx]
        if not isinstance(layer, LinearizedLayerCache):
            raise TypeError(f"layer {layer_idx} keeps softmax attention; it has no recurrent state")
        return layer

    def nbytes(self) -> int:
        """Bytes held by every layer's state (recurrent state, window, sinks, KV cache)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, LinearizedLayerCache):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.nelement() * layer.keys.element_size() * 2
        return total
