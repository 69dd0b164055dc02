"""The dispatcher: one signature per op, the backend chosen per call.

Layout `[B, T, H, D]`, log-space gates (<= 0), fp32 accumulation and fp32 state.
Backends: `naive` (loop over time, the fp64 reference), `torch` (chunked PyTorch, the CPU
path) and `triton` (chunked GPU kernels). The dispatcher uses `triton` for CUDA tensors
and `torch` otherwise; set LINEARIZE_KERNEL_BACKEND=naive|torch|triton to force one.
"""
from __future__ import annotations

import os

import torch

from .hybrid.past_window import combine_past_window, delay_into_state, linear_key_mask
from .hybrid.sparse_cache import sparse_past_window_attention  # one PyTorch path, any device
from .utils import tracks_grad
from .window.cached import cached_window_attention as _cached_window_attention  # one PyTorch path, any device

BACKENDS = ("naive", "torch", "triton")
ENV_VAR = "LINEARIZE_KERNEL_BACKEND"


def select_backend(x: torch.Tensor) -> str:
    """The backend the dispatcher uses for tensors like `x` (honours LINEARIZE_KERNEL_BACKEND)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)} or auto")
        return forced
    if x.is_cuda and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    q: [B, T, H, K]; k: [B, T, HKV, K]; v: [B, T, HKV, V]; g: [B, T, HKV, K] or [B, T, HKV]
    (log decay <= 0); initial_state: [N, HKV, K, V]. Returns o [B, T, H, V] and the final
    state [N, HKV, K, V] in fp32 (or None). A normalizer is obtained by appending a column
    of ones to v (see `linearize.mixers.base`).
    """
    backend = backend or select_backend(q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if backend == "naive":
        from .gla.naive import naive_gla

        return naive_gla(q, k, v, g, **kwargs)
    if backend == "torch":
        from .gla.torch_chunk import chunk_gla

        return chunk_gla(q, k, v, g, **kwargs)
    if backend == "triton":
        from .gla.triton_chunk import triton_chunk_gla

        return triton_chunk_gla(q, k, v, g, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def recurrent_gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention for a few tokens against a carried state (decoding).

    Same shapes as `gated_linear_attention`. Steps token by token with no chunking: the fused
    Triton kernel on CUDA (forward only), the PyTorch recurrence elsewhere (`naive` forces the
    fp64-exact reference loop).
    """
    backend = backend or select_backend(q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if backend == "triton" and not tracks_grad(q, k, v, g):
        from .gla.triton_recurrent import fused_recurrent_gla

        return fused_recurrent_gla(q, k, v, g, **kwargs)
    if backend == "naive":
        from .gla.naive import naive_gla

        return naive_gla(q, k, v, g, **kwargs)
    from .gla.torch_recurrent import recurrent_gla

    return recurrent_gla(q, k, v, g, **kwargs)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale q_t S_t.

    q: [B, T, H, K]; k: [B, T, HKV, K] (both usually L2-normalised); v: [B, T, HKV, V];
    beta, g: [B, T, HKV] (g log decay <= 0); scale None: K ** -0.5; initial_state
    [N, HKV, K, V]. Returns o [B, T, H, V] and the final state [N, HKV, K, V] fp32 (or None).
    Backends: `naive` (fp64 loop) and `torch` (chunked, WY form); `triton` runs the torch path
    (no chunked Triton kernel yet: it works on CUDA tensors, at PyTorch speed).
    """
    backend = backend or select_backend(q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if backend == "naive":
        from .delta.naive import naive_gated_delta_rule

        return naive_gated_delta_rule(q, k, v, beta, g, **kwargs)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from .delta.torch_chunk import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, beta, g, **kwargs)


def recurrent_gated_delta_rule(q, k, v, beta, g, *, scale=None, initial_state=None, output_final_state=False,
                               backend=None):
    """The gated delta rule token by token against a carried state (decoding); shapes as
    `gated_delta_rule` (initial_state [B, HKV, K, V]). The fused Triton kernel on CUDA (forward
    only), the PyTorch loop elsewhere; `naive` forces the fp64 reference."""
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    backend = backend or select_backend(q)
    if backend == "triton" and not tracks_grad(q, k, v, beta, g, initial_state):
        from .delta.triton_recurrent import fused_recurrent_gated_delta_rule

        return fused_recurrent_gated_delta_rule(q, k, v, beta, g, **kwargs)
    if backend == "naive":
        from .delta.naive import naive_gated_delta_rule

        return naive_gated_delta_rule(q, k, v, beta, g, **kwargs)
    from .delta.torch_recurrent import recurrent_gated_delta_rule as step

    return step(q, k, v, beta, g, **kwargs)


def hybrid_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor,
    *,
    window: int | None,
    mode: str = "mix",
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Window softmax + gated linear attention of one layer in one call (fused on CUDA).

    q_win [B, T, H, D], k_win [B, T, HKV, D] (window branch, after RoPE); v [B, T, HKV, V];
    q_lin [B, T, H, K], k_lin [B, T, HKV, K] (feature-mapped); g log decay. mode "mix":
    o = w_win * window + w_lin * gla (Liger Attention); mode "shared": LoLCATs' shared
    denominator with per-head weight c. Keyword arguments as in `naive_hybrid_attention`
    (num_sink_tokens, sink_logits, scale_win, scale_lin, w_win, w_lin, c, key_mask,
    cu_seqlens, initial_state, output_final_state, softcap). Returns o [B, T, H, V] and the final
    state ([N, HKV, K, V], or V + 1 columns in shared mode) or None.
    """
    backend = backend or select_backend(q_win)
    if backend == "naive":
        from .hybrid.naive import naive_hybrid_attention as fn
    elif backend == "torch":
        from .hybrid.torch_chunk import chunk_hybrid_attention as fn
    elif backend == "triton":
        from .hybrid.triton_chunk import triton_hybrid_attention as fn
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return fn(q_win, k_win, v, q_lin, k_lin, g, window=window, mode=mode, **kwargs)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    need_lse: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sliding-window softmax attention with sink tokens and sink logits.

    q: [B, T, H, D]; k: [B, T, HKV, D]; v: [B, T, HKV, Dv]; sink_logits: [H] or [H, M];
    key_mask: [B, T] (False = padding). Returns o [B, T, H, Dv] and lse [B, T, H] (fp32),
    the log of each row's full softmax denominator (sink logits included). need_lse=False
    tells the op that lse is not used: the CPU path may then return None for it and run faster.
    softcap: c caps the scaled scores to c * tanh(s / c) before the softmax (Gemma-2); None = no cap.
    """
    backend = backend or select_backend(q)
    kwargs = dict(window=window, num_sink_tokens=num_sink_tokens, sink_logits=sink_logits, scale=scale,
                  key_mask=key_mask, cu_seqlens=cu_seqlens, softcap=softcap)
    if backend == "naive":
        from .window.naive import naive_window_attention

        return naive_window_attention(q, k, v, **kwargs)
    if backend == "torch":
        from .window.torch_chunk import chunk_window_attention

        return chunk_window_attention(q, k, v, need_lse=need_lse, **kwargs)
    if backend == "triton":
        from .window.triton_chunk import triton_window_attention

        return triton_window_attention(q, k, v, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def cached_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    num_sink_tokens: int = 0,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
    win_k: torch.Tensor | None = None,
    win_v: torch.Tensor | None = None,
    win_mask: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window softmax of new tokens over a decode cache's sinks and window and their own keys.

    q [B, T, H, D], k [B, T, HKV, D], v [B, T, HKV, Dv]; sink_k/sink_v [B, S, HKV, D / Dv] with
    sink_mask [B, S]; win_k/win_v [B, L, HKV, D / Dv] (the L positions before the chunk) with
    win_mask [B, L]; seen [B] real tokens before the chunk (see `kernels.window.cached`).
    Returns o [B, T, H, Dv], lse and the row max m [B, T, H] (fp32). `naive` forces the
    per-query reference; every other backend runs the PyTorch op, on any device.
    """
    backend = backend or select_backend(q)
    kwargs = dict(window=window, num_sink_tokens=num_sink_tokens, sink_k=sink_k, sink_v=sink_v, sink_mask=sink_mask,
                  win_k=win_k, win_v=win_v, win_mask=win_mask, seen=seen, sink_logits=sink_logits, scale=scale,
                  key_mask=key_mask, softcap=softcap)
    if backend == "naive":
        from .window.naive import naive_cached_window_attention

        return naive_cached_window_attention(q, k, v, **kwargs)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _cached_window_attention(q, k, v, **kwargs)


def window_max_score(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each query's largest score over the keys the window op lets it attend (soft-capped
    scores when `softcap` is given).

    q: [B, T, H, D]; k: [B, T, HKV, D]. Returns m [B, T, H] fp32 (-inf for a query that sees
    nothing), differentiable. `naive` is the dense fp64-capable reference; every other backend
    runs the blocked PyTorch op, on any device.
    """
    backend = backend or select_backend(q)
    kwargs = dict(window=window, num_sink_tokens=num_sink_tokens, scale=scale, key_mask=key_mask,
                  cu_seqlens=cu_seqlens, softcap=softcap)
    if backend == "naive":
        from .window.naive import naive_window_max_score

        return naive_window_max_score(q, k, **kwargs)
    from .window.max_score import band_max_score

    return band_max_score(q, k, **kwargs)


def past_window_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor | None,
    *,
    window: int,
    num_sink_tokens: int = 0,
    scale: float | None = None,
    window_factor: torch.Tensor,
    linear_factor: torch.Tensor | float = 1.0,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """LoLCATs' hybrid as published, for whole sequences (see `kernels.hybrid.past_window`).

    q_win [B, T, H, D], k_win [B, T, HKV, D] (after RoPE); v [B, T, HKV, V]; q_lin [B, T, H, F];
    k_lin [B, T, H or HKV, F] feature-mapped keys; g log decay [B, T, H or HKV(, F)] or None;
    window_factor (gamma) and linear_factor (lam): [H] or scalars; softcap: the window scores'
    cap (None = none). Returns o [B, T, H, V] (fp32). The window op, its row max and the GLA over keys delayed by `window` are the
    dispatcher's ops; `naive` forces the dense reference.
    """
    backend = backend or select_backend(q_win)
    if backend == "naive":
        from .hybrid.naive import naive_past_window_attention

        return naive_past_window_attention(q_win, k_win, v, q_lin, k_lin, g, window=window,
                                           num_sink_tokens=num_sink_tokens, scale=scale,
                                           window_factor=window_factor, linear_factor=linear_factor,
                                           key_mask=key_mask, cu_seqlens=cu_seqlens, softcap=softcap)
    B, T = q_win.shape[:2]
    win = dict(window=window, num_sink_tokens=num_sink_tokens, scale=scale, key_mask=key_mask, cu_seqlens=cu_seqlens,
               softcap=softcap)
    o_win, lse = sliding_window_attention(q_win, k_win, v, backend=backend, need_lse=True, **win)
    m = window_max_score(q_win, k_win, backend=backend, **win)
    keep = linear_key_mask(B, T, num_sink_tokens, key_mask, cu_seqlens, device=q_win.device)
    (k_in, v_in), kept, _ = delay_into_state([k_lin, v], keep, window, cu_seqlens=cu_seqlens)
    if g is None:
        g = k_in.new_zeros(*k_in.shape[:3], dtype=torch.float32)
    num, den, _ = linear_recurrence(q_lin, k_in, v_in, g, keep=kept, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                    backend=backend)
    return combine_past_window(o_win, lse, m, num, den, window_factor, linear_factor)


def linear_recurrence(q, k, v, g, *, keep=None, key_mask=None, normalize=True, cu_seqlens=None, backend=None,
                      initial_state=None, output_final_state=False, step=False):
    """A mixer's gated linear branch: phi(q) S, and phi(q) z when normalized.

    q [B, T, H, F]; k [B, T, Hs, F] with Hs the state's heads (H or HKV); v [B, T, HKV, V]
    and g [B, T, HKV or Hs(, F)] are repeated to Hs heads. keep: [B, T] tokens whose key
    enters the state (others are zeroed); key_mask: [B, T] real steps (padding decays
    nothing: g = 0 there). step=True takes the step-by-step recurrence (a few decode tokens).
    Returns num [B, T, H, V], den [B, T, H] (at least fp32; None unless normalize) and the
    final state [N, Hs, F, V (+ 1)] or None.
    """
    Hs = k.shape[2]
    if keep is not None:
        k = k * keep.to(k.dtype)[:, :, None, None]
    if normalize:
        ones = torch.ones_like(v[..., :1]) if keep is None else keep.to(v.dtype)[:, :, None, None].expand(*v.shape[:3], 1)
        v = torch.cat([v, ones], dim=-1)
    v = v.repeat_interleave(Hs // v.shape[2], dim=2)
    if key_mask is not None:
        g = g * key_mask.to(g.dtype).reshape(*key_mask.shape, *([1] * (g.dim() - 2)))
    g = g.repeat_interleave(Hs // g.shape[2], dim=2)
    fn = recurrent_gated_linear_attention if step else gated_linear_attention
    extra = {} if step else dict(cu_seqlens=cu_seqlens)
    o, final = fn(q, k.to(q.dtype), v.to(q.dtype), g, scale=1.0, initial_state=initial_state,
                  output_final_state=output_final_state, backend=backend, **extra)
    if not normalize:
        return o, None, final
    return o[..., :-1], o[..., -1].to(torch.promote_types(o.dtype, torch.float32)), final


__all__ = ["cached_window_attention", "sparse_past_window_attention", "combine_past_window", "delay_into_state", "linear_key_mask", "window_max_score", "past_window_attention", "linear_recurrence", "gated_linear_attention", "gated_delta_rule", "recurrent_gated_delta_rule", "hybrid_attention", "recurrent_gated_linear_attention", "sliding_window_attention", "select_backend", "BACKENDS", "ENV_VAR"]
