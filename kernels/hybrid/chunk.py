"""Intra-layer hybrid on the CPU path: the chunked window and GLA ops, then one combination."""
from __future__ import annotations

import torch

from ..gla.chunk import chunk_gla
from ..window.chunk import chunk_window_attention
from .naive import check_hybrid_inputs, combine_hybrid, head_weights, mask_linear_inputs


def chunk_hybrid_attention(
    q_win: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor,
    *,
    window: int | None,
    mode: str = "mix",
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale_win: float | None = None,
    scale_lin: float = 1.0,
    w_win: torch.Tensor | float | None = None,
    w_lin: torch.Tensor | float | None = None,
    c: torch.Tensor | float | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as `naive_hybrid_attention` (shapes documented there),
    computed with `chunk_window_attention` and `chunk_gla`."""
    check_hybrid_inputs(q_win, k_win, v, q_lin, k_lin, g, mode)
    H = q_win.shape[2]
    o_win, lse = chunk_window_attention(q_win, k_win, v, window=window, num_sink_tokens=num_sink_tokens,
                                        sink_logits=sink_logits, scale=scale_win, key_mask=key_mask,
                                        cu_seqlens=cu_seqlens)
    k_lin, g = mask_linear_inputs(k_lin, g, key_mask)
    v_lin = v if mode == "mix" else torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o_lin, final_state = chunk_gla(q_lin, k_lin, v_lin, g, scale=scale_lin, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    acc = torch.float64 if q_win.dtype == torch.float64 else torch.float32
    ref = torch.empty(0, dtype=acc, device=q_win.device)
    o = combine_hybrid(o_win.to(acc), lse.to(acc), o_lin.to(acc), mode=mode,
                       w_win=head_weights(w_win, H, 0.5, ref), w_lin=head_weights(w_lin, H, 0.5, ref),
                       c=head_weights(c, H, 1.0, ref))
    return o.to(q_win.dtype), final_state
