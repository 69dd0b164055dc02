"""Decode state for a linearized model, as one transformers `Cache`.

Per linearized layer (`LinearizedLayerCache`): the fp32 recurrent state (+ normalizer) per
KV head, the sink tokens' keys/values and the last `window - 1` post-RoPE keys/values of the
window branch, with validity flags so padded positions never count. Per softmax-kept layer:
an ordinary `DynamicLayer`. Memory of a linearized layer does not grow with the context.

LoLCATs' linear branch takes in each key as it leaves the window. Its layers keep one more
position (`window` in all) and read the leaving keys and values from the window cache
(`pending_linear`) instead of holding a second copy; where the feature map reads keys before
RoPE, the cache also keeps each position's rotation (half of cos and of sin, [B, L, D]) and
undoes it on the leaving key. Every layer sees the same positions, so these rotations (and
those LoLA's sparse cache keeps for its waiting keys) are equal from layer to layer: the layers
of one `LinearizeCache` hold one copy (`SharedRotations`), not one each.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .kernels import cached_window_attention
from .kernels.rope import undo_rope
from .state import linearize_state


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, L, ...] with n zeros (False) before its first position."""
    return torch.cat([x.new_zeros(x.shape[0], n, *x.shape[2:]), x], dim=1) if n else x


class SharedRotations:
    """The rotations several layers' states hold with equal values, kept once: a layer hands in
    the rotation tensor it is about to keep and gets back an equal one already held, if any.
    Equality is checked (bit for bit), never assumed, so layers whose rotations differ (Gemma-3's
    local and global RoPE) each keep their own. Only weak references: a rotation no layer holds
    any more is freed."""

    def __init__(self):
        self.held: list[weakref.ref] = []

    def share(self, t: torch.Tensor) -> torch.Tensor:
        self.held = [ref for ref in self.held if ref() is not None]
        for ref in self.held:
            h = ref()
            if h is t or (h is not None and h.shape == t.shape and h.dtype == t.dtype and h.device == t.device
                          and torch.equal(h, t)):
                return h
        self.held.append(weakref.ref(t))
        return t


class LinearizedLayerCache(CacheLayerMixin):
    """Constant-size state of one linearized layer (batch-first, `[B, L, HKV, D]` layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int = 0, num_sink_tokens: int = 0, rotations: SharedRotations | None = None):
        super().__init__()
        self.window = window
        self.rotations = SharedRotations() if rotations is None else rotations
        self.num_sink_tokens = num_sink_tokens
        self.seen = 0
        self.recurrent: torch.Tensor | None = None
        self.valid_seen: torch.Tensor | None = None  # [B] real tokens seen so far
        self.sink_k = self.sink_v = self.sink_valid = None  # [B, S, HKV, D], [B, S]
        self.win_k = self.win_v = self.win_valid = self.win_sink = None  # [B, L, HKV, D], [B, L]
        # LoLCATs with the feature map before RoPE: [cos | sin] halves of each window position's
        # rotation, [B, L, D], to undo it on the key that leaves the window.
        self.win_rope = None
        # LoLA's sparse cache (`linearize.kernels.hybrid.sparse_cache`): its tensors by name.
        self.sparse: dict[str, torch.Tensor] | None = None
        # Head-level hybrid: the kept heads' post-RoPE keys/values [B, L, n, D], growing, and [B, L].
        self.full_k = self.full_v = self.full_valid = None
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
                "win_rope", "full_k", "full_v", "full_valid"]

    def _map(self, fn) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.sparse is not None:
            self.sparse = {name: fn(t) for name, t in self.sparse.items()}
        self._share_rotations()

    def _share_rotations(self) -> None:
        """Hold the window's rotations (and the sparse cache's) as the other layers' copy where equal."""
        if self.win_rope is not None:
            self.win_rope = self.rotations.share(self.win_rope)
        if self.sparse is not None and "recent_rope" in self.sparse:
            self.sparse["recent_rope"] = self.rotations.share(self.sparse["recent_rope"])

    def keep_sparse(self, state: dict[str, torch.Tensor]) -> None:
        """Keep LoLA's sparse-cache state (`kernels.hybrid.sparse_cache`'s dict of tensors)."""
        self.sparse = state
        self._share_rotations()

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

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer's state holds (rotations shared with other layers included)."""
        tensors = [getattr(self, n) for n in self._tensors() if getattr(self, n) is not None]
        return tensors + list((self.sparse or {}).values())

    def nbytes(self) -> int:
        return _nbytes(self.state_tensors())

    # -- used by the mixers -----------------------------------------------------------------
    def has_window_past(self) -> bool:
        return self.win_k is not None or self.sink_k is not None

    def advance(self, T: int) -> None:
        """Count T new positions, padded ones included (`get_seq_length`, transformers' mask
        sizes); the real tokens are counted in `valid_seen` as the window stores them."""
        self.seen += T

    def _window_keys_kept(self) -> torch.Tensor:
        """[B, L] bool: the window positions that hold a real token that is not a sink."""
        return self.win_valid & ~self.win_sink

    def pending_linear(self, n: int, window: int, unrotate: bool):
        """The n oldest of the `window` positions before the next chunk, the keys a LoLCATs
        layer's state takes in over the chunk's first n steps (n <= window; positions before
        the first stored one are empty): ([keys, values] [B, n, HKV, D], keep [B, n] bool, real
        and not a sink). unrotate: undo each key's RoPE (for a feature map that reads keys
        before it). None before the first chunk."""
        if self.win_k is None:
            return None
        missing = max(window - self.win_k.shape[1], 0)
        xs = [self.win_k, self.win_v, self._window_keys_kept()] + ([self.win_rope] if unrotate else [])
        xs = [_left_pad(x, missing)[:, :n] for x in xs]
        if unrotate:
            xs[0] = undo_rope(xs[0], xs.pop())
        return xs[:2], xs[2]

    def _new_ranks(self, B: int, T: int, key_mask: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if key_mask is None else key_mask.bool()
        if self.valid_seen is None:
            self.valid_seen = torch.zeros(B, dtype=torch.long, device=device)
        rank = self.valid_seen[:, None] + valid.long().cumsum(-1) - 1
        return valid, rank

    def store_window(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, *, window: int,
                     num_sink_tokens: int, leaving: bool = False, halves: torch.Tensor | None = None) -> None:
        """Append new post-RoPE keys/values [B, T, HKV, D]: sinks kept apart, the window trimmed
        to its last `window - 1` positions, or `window` with `leaving` (the key that leaves the
        window at the next step stays for `pending_linear`). halves: the chunk's `rope_halves`
        [B, T, D], kept beside the keys to undo their rotation, or None."""
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
        keep = window if leaving else max(window - 1, 0)
        if halves is not None:  # the rotation may come with batch 1
            self.win_rope = self.rotations.share(_cat(self.win_rope, halves.to(k.dtype).expand(B, T, -1))[:, -keep:])
        self.win_k = _cat(self.win_k, k)[:, -keep:] if keep else k[:, :0]
        self.win_v = _cat(self.win_v, v)[:, -keep:] if keep else v[:, :0]
        self.win_valid = _cat(self.win_valid, valid)[:, -keep:] if keep else valid[:, :0]
        self.win_sink = _cat(self.win_sink, is_sink)[:, -keep:] if keep else is_sink[:, :0]
        self.valid_seen = self.valid_seen + valid.long().sum(-1)

    def full_attention_kv(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        """Append the kept heads' new keys/values [B, T, n, D] (head-level hybrid) and return
        every one so far, [B, L, n, D] twice, with their validity [B, L] bool."""
        valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
        self.full_k, self.full_v = _cat(self.full_k, k), _cat(self.full_v, v)
        self.full_valid = _cat(self.full_valid, valid)
        return self.full_k, self.full_v, self.full_valid

    def window_attention(self, q, k, v, key_mask, *, window: int, num_sink_tokens: int, sink_logits, scale: float,
                         softcap: float | None = None, leaving: bool = False, halves=None):
        """Softmax of new queries [B, T, H, D] over the cached sinks and window and the new keys
        (`kernels.cached_window_attention`), then stores the new keys/values (`leaving`, halves:
        see `store_window`). Returns o [B, T, H, D], lse [B, T, H] (fp32) and each row's largest
        score m [B, T, H] (fp32)."""
        win_k = win_v = win_mask = None
        if self.win_k is not None:
            reach = slice(-(window - 1), None) if window > 1 else slice(0, 0)  # the leaving key is out of reach
            win_k, win_v = self.win_k[:, reach], self.win_v[:, reach]
            win_mask = self._window_keys_kept()[:, reach]
        out = cached_window_attention(q, k, v, window=window, num_sink_tokens=num_sink_tokens, sink_k=self.sink_k,
                                      sink_v=self.sink_v, sink_mask=self.sink_valid, win_k=win_k, win_v=win_v,
                                      win_mask=win_mask, seen=self.valid_seen, sink_logits=sink_logits, scale=scale,
                                      key_mask=key_mask, softcap=softcap)
        self.store_window(k, v, key_mask, window=window, num_sink_tokens=num_sink_tokens, leaving=leaving, halves=halves)
        return out


class LinearizeCache(Cache):
    """The whole model's decode state: `LinearizedLayerCache` for converted layers and
    `DynamicLayer` for layers that kept softmax attention. Pass it to `model(...)` or let
    `model.generate()` create it."""

    def __init__(self, model=None, *, num_layers: int | None = None, layer_specs: dict | None = None):
        if model is not None:
            st = linearize_state(model)
            num_layers = st.num_layers
            window = st.config.window if st.config.has_window_branch else 0
            layer_specs = {i: (window, st.config.num_sink_tokens) for i in st.layers}
        if num_layers is None or layer_specs is None:
            raise ValueError("LinearizeCache needs a linearized model (or num_layers and layer_specs)")
        rotations = SharedRotations()
        layers = [LinearizedLayerCache(*layer_specs[i], rotations=rotations) if i in layer_specs else DynamicLayer()
                  for i in range(num_layers)]
        super().__init__(layers=layers)

    def linear_layer(self, layer_idx: int) -> LinearizedLayerCache:
        layer = self.layers[layer_idx]
        if not isinstance(layer, LinearizedLayerCache):
            raise TypeError(f"layer {layer_idx} keeps softmax attention; it has no recurrent state")
        return layer

    def nbytes(self) -> int:
        """Bytes held by every layer's state (recurrent state, window, sinks, KV cache), a
        tensor that several layers share counted once."""
        tensors = []
        for layer in self.layers:
            if isinstance(layer, LinearizedLayerCache):
                tensors += layer.state_tensors()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                tensors += [layer.keys, layer.values]
        return _nbytes(list({id(t): t for t in tensors}.values()))


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)
