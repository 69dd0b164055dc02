"""LoLA's sparse global cache on the past-window hybrid (McDermott et al., "LoLA: Low-Rank
Linear Attention With Sparse Caching", arXiv 2505.23666; its reference code builds on
LoLCATs' `linear_window_attention_sw`).

Every key/value pair that leaves the softmax window goes to one of two places: the recurrent
state (S = sum decay phi(k) v^T, z = sum decay phi(k)), or, when the state would reproduce it
worst, a small cache of `budget` pairs per state head that the window's softmax keeps seeing
exactly. Sink tokens stay exact for good and never compete.

Selection runs in blocks of `block` positions, as LoLA's chunks: before the queries at a rank
a that is a multiple of `block` (a > 0), every non-sink token j <= a - window not yet placed
becomes a candidate beside the pairs already cached. Each candidate's self-recall error

    e_j = || v_j - S_a phi(k_j) / (z_a . phi(k_j)) ||      (prediction 0 while z_a . phi(k_j) = 0)

is measured against the state as it is at a. The `budget` largest errors stay exact (ties: the
earlier token; a repeated token whose keys were computed in different calls can differ from
its twin by rounding and break the tie either way); the others enter the state with the decay
they would carry had they entered when they left the window, exp(L_a - L_{j + window}) with L
the cumulative log gate. Between selections the waiting tokens stay exact, so a query sees
between `window` and `window + block - 1` recent tokens exactly. `budget=0, block=1` is LoLCATs' past-window hybrid;
a budget as large as the sequence never fills the state and reproduces softmax attention.

Outputs combine as in `combine_past_window`: gamma on the max-shifted exact terms (sinks,
cached pairs, recent tokens), lam on the linear ones. Ranks count real tokens only, so left
padding changes nothing; rows run one at a time (the selection is sequential by nature).

Where we differ from LoLA's code: blocks are aligned to absolute ranks (so a prompt split
across calls, or decoded token by token, gives the same result as one forward); a gate, when
the model has one, decays the state and the candidates as above (LoLA has no gate).

An option beyond LoLA (`cache_heads`): LoLA keeps `budget` pairs per state head, and with one
state per query head (LoLCATs' published form) a GQA model stores each pair's key and value
once per query head of its group. With `cache_heads=HKV` the heads of a group share one set:
a candidate's error is the norm of the group's state heads' errors together, and a pair is
cached or enters every state of the group as one, for H / HKV times fewer stored pairs.

Keys are mapped to features only where a selection reads them: the state keeps the unmapped
keys of the recent tokens per KV head (not their features per state head, several times larger)
and applies `key_map` to the candidates of each selection. Where k is kl rotated (the feature
map reads keys before RoPE), the caller may pass the rotation (`k_rope`): the state then keeps
the recent tokens' unmapped keys and their rotation's half cos/sin ([R, D]) instead of a second
copy of their keys ([R, HKV, D]), and redoes the rotation bit for bit where the softmax reads them.

The decode state (`state`, a dict of tensors, batch-first) holds per row: `seen` [B];
`sink_k`, `sink_v` [B, S, HKV, D]; the recent tokens `recent_k`, `recent_v`, `recent_kl`
[B, R, HKV, D] (with `k_rope`, `recent_rope` [B, R, D] in place of `recent_k`), `recent_L`
[B, R, Hs, Fg] (left-aligned, `recent_len` [B] valid,
R <= window + block - 1); the cached pairs `sel_k`, `sel_v`, `sel_kl` [B, G, Hc, D], `sel_L`
[B, G, Hs, Fg], `sel_rank` [B, G, Hc], `sel_valid` [B, G, Hc]; the state `S` [B, Hs, F, Dv],
`z` [B, Hs, F] and the log gates `L_state`, `L_last` [B, Hs, Fg] at its last update and at the
last token.
"""
from __future__ import annotations

import torch

from ..rope import redo_rope
from ..utils import soft_cap
from .past_window import combine_past_window

_LAST = torch.iinfo(torch.long).max


def sparse_past_window_attention(q, k, v, fq, kl, g, *, key_map, state_heads: int, window: int, num_sink_tokens: int,
                                 budget: int, block: int, scale: float, window_factor, linear_factor=1.0, key_mask=None,
                                 cu_seqlens=None, state: dict | None = None, softcap: float | None = None,
                                 k_rope: torch.Tensor | None = None, cache_heads: int | None = None):
    """The past-window hybrid with a sparse cache of `budget` exact pairs per cache head.

    q: [B, T, H, D] and k: [B, T, HKV, D] RoPE'd, for the softmax; v: [B, T, HKV, Dv];
    fq: [B, T, H, F] the feature-mapped query; kl: [B, T, HKV, D] the keys the feature map
    reads (unmapped); key_map: [1, N, Hs, D] keys repeated to the state heads -> their features
    [1, N, Hs, F] (per token and head, so where it runs changes nothing); state_heads: Hs (H or HKV);
    g: [B, T, HKV or Hs] or [B, T, HKV or Hs, F] log gates <= 0; window_factor (gamma),
    linear_factor (lam): [H] or scalars. key_mask: [B, T] real tokens (padding is skipped);
    cu_seqlens: packed sequences (B = 1), each with a fresh state (no `state` then).
    state: the previous call's state dict or None for fresh sequences. softcap: the exact
    scores' cap c * tanh(s / c) (Gemma-2), None = none. k_rope: [B, T, D] the `rope_halves` of
    the rotation that made k from kl, or None (the state then keeps k as well as kl).
    cache_heads: Hc, how many heads hold their own `budget` pairs (None: Hs, as LoLA; HKV:
    one set per KV head, shared by its state heads, which pick it by their summed squared
    errors; a multiple of HKV dividing Hs).
    Returns o [B, T, H, Dv] (fp32, fp64 stays; 0 at padding) and the new state dict.
    """
    B, T, H, _ = q.shape
    Hs = state_heads
    Hc = Hs if cache_heads is None else cache_heads
    if H % Hs or Hs % k.shape[2]:
        raise ValueError(f"state heads {Hs} must divide the query heads {H} and be a multiple of the KV heads "
                         f"{k.shape[2]}")
    if Hs % Hc or Hc % k.shape[2]:
        raise ValueError(f"cache heads {Hc} must divide the state heads {Hs} and be a multiple of the KV heads "
                         f"{k.shape[2]}")
    if cu_seqlens is not None and state is not None:
        raise ValueError("packed sequences (cu_seqlens) start fresh: pass no state")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = g.to(acc)
    if g.dim() == 3:
        g = g[..., None]
    g = g.repeat_interleave(Hs // g.shape[2], dim=2)
    spec = dict(window=window, sinks=num_sink_tokens, budget=budget, block=block, scale=scale, softcap=softcap,
                gamma=window_factor, lam=linear_factor, H=H, Hs=Hs, Hc=Hc, key_map=key_map,
                recent_key="recent_k" if k_rope is None else "recent_rope")
    if k_rope is not None:
        k = k_rope  # what the state keeps of k
    o = q.new_zeros(B, T, H, v.shape[-1], dtype=acc)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            rows = [x[:, s:e] for x in (q, k, v, fq, kl, g)]
            o[:, s:e] = _run_row(*[x[0] for x in rows], _fresh_row(rows, spec, acc), spec)[0][None]
        return o, None
    rows_out = []
    for b in range(B):
        idx = torch.arange(T, device=q.device) if key_mask is None else key_mask[b].bool().nonzero().squeeze(-1)
        xs = [x[b, idx] for x in (q, k, v, fq, kl, g)]
        st = _fresh_row([x[None] for x in xs], spec, acc) if state is None else _unpack_row(state, b)
        o_b, st = _run_row(*xs, st, spec)
        o[b, idx] = o_b
        rows_out.append(st)
    return o, _pack(rows_out, spec)


# -- one row ---------------------------------------------------------------------------------
def _fresh_row(xs, spec, acc) -> dict:
    """An empty row state shaped like the inputs xs = [q, k, v, fq, kl, g] ([1, T, ...])."""
    q, k, v, fq, kl, g = xs  # k: the RoPE'd keys, or with `k_rope` their rotation [1, T, D]
    HKV, D, Dv, Dl = v.shape[2], q.shape[3], v.shape[3], kl.shape[3]
    Hs, Hc, F, Fg = spec["Hs"], spec["Hc"], fq.shape[3], g.shape[3]
    G = spec["budget"]
    dev = k.device
    return {
        "seen": 0,
        "sink_k": k.new_zeros(0, HKV, D), "sink_v": v.new_zeros(0, HKV, Dv),
        spec["recent_key"]: k.new_zeros(0, *k.shape[2:]), "recent_v": v.new_zeros(0, HKV, Dv),
        "recent_kl": kl.new_zeros(0, HKV, Dl), "recent_L": torch.zeros(0, Hs, Fg, dtype=acc, device=dev),
        "sel_k": k.new_zeros(G, Hc, D), "sel_v": v.new_zeros(G, Hc, Dv), "sel_kl": kl.new_zeros(G, Hc, Dl),
        "sel_L": torch.zeros(G, Hs, Fg, dtype=acc, device=dev),
        "sel_rank": torch.full((G, Hc), _LAST, dtype=torch.long, device=dev),
        "sel_valid": torch.zeros(G, Hc, dtype=torch.bool, device=dev),
        "S": torch.zeros(Hs, F, Dv, dtype=acc, device=dev), "z": torch.zeros(Hs, F, dtype=acc, device=dev),
        "L_state": torch.zeros(Hs, Fg, dtype=acc, device=dev), "L_last": torch.zeros(Hs, Fg, dtype=acc, device=dev),
    }


def _run_row(q, k, v, fq, kl, g, st, spec):
    """One row's new real tokens q [n, H, D], ... g [n, Hs, Fg] -> o [n, H, Dv], new state."""
    n = q.shape[0]
    if n == 0:
        return q.new_zeros(0, q.shape[1], v.shape[-1], dtype=st["S"].dtype), st
    L = st["L_last"][None] + torch.cumsum(g, dim=0)  # [n, Hs, Fg]
    r0, C = st["seen"], spec["block"]
    cuts = [i for i in range(n) if (r0 + i) % C == 0] + [n]
    if cuts[0] != 0:
        cuts.insert(0, 0)
    outs = []
    for i0, i1 in zip(cuts[:-1], cuts[1:]):
        a = r0 + i0
        if a % C == 0 and a > 0:
            _select(st, a, L[i0], spec)
        _append(st, a, k[i0:i1], v[i0:i1], kl[i0:i1], L[i0:i1], spec)
        outs.append(_attend(st, a, q[i0:i1], fq[i0:i1], L[i0:i1], spec))
    st["L_last"] = L[-1]
    return torch.cat(outs), st


def _append(st, a, k, v, kl, L, spec) -> None:
    """Tokens at ranks a, a+1, ...: sink ranks to the sinks, the rest to the recent tokens
    (k: the RoPE'd keys, or with `k_rope` their rotation)."""
    n_sink = max(0, min(spec["sinks"] - a, k.shape[0]))
    if n_sink:
        sink_k = k[:n_sink] if spec["recent_key"] == "recent_k" else redo_rope(kl[None, :n_sink], k[None, :n_sink])[0]
        st["sink_k"] = torch.cat([st["sink_k"], sink_k.to(st["sink_k"].dtype)])
        st["sink_v"] = torch.cat([st["sink_v"], v[:n_sink]])
    for name, x in ((spec["recent_key"], k), ("recent_v", v), ("recent_kl", kl), ("recent_L", L)):
        st[name] = torch.cat([st[name], x[n_sink:].to(st[name].dtype)])
    st["seen"] = a + k.shape[0]


def _to_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, h, ...] -> [N, n, ...], each of the h heads repeated for its n / h heads (x itself
    when h = n)."""
    return x if n == x.shape[1] else x.repeat_interleave(n // x.shape[1], dim=1)


def _recent_keys(st, n: int | None = None) -> torch.Tensor:
    """The first n (default all) recent tokens' RoPE'd keys [n, HKV, D]."""
    if "recent_k" in st:
        return st["recent_k"][:n]
    return redo_rope(st["recent_kl"][None, :n], st["recent_rope"][None, :n])[0]


def _select(st, a, L_a, spec) -> None:
    """The selection before the queries at rank a: the pending tokens and the cached pairs
    compete; the `budget` worst reproduced stay exact, the rest enter the state."""
    W, G, Hs, Hc = spec["window"], spec["budget"], spec["Hs"], spec["Hc"]
    start = st["seen"] - st["recent_kl"].shape[0]  # rank of the first recent token
    P = min(max(0, a - W - start + 1), st["recent_kl"].shape[0])
    if P == 0:
        return
    decay = torch.exp(L_a - st["L_state"])  # [Hs, Fg]
    S, z = st["S"] * decay[..., None], st["z"] * decay
    ranks = torch.arange(start, start + P, device=L_a.device)
    leave = ranks + W - start  # index of rank j + window among recent tokens, or = len: rank a
    L_buf = torch.cat([st["recent_L"], L_a[None]])
    acc = S.dtype
    cand = {
        "k": torch.cat([st["sel_k"], _to_heads(_recent_keys(st, P), Hc).to(st["sel_k"].dtype)]),
        "v": torch.cat([st["sel_v"], _to_heads(st["recent_v"][:P], Hc).to(st["sel_v"].dtype)]),
        "kl": torch.cat([st["sel_kl"], _to_heads(st["recent_kl"][:P], Hc).to(st["sel_kl"].dtype)]),
        "L": torch.cat([st["sel_L"], L_buf[leave]]),  # per state head
        "rank": torch.cat([st["sel_rank"], ranks[:, None].expand(P, Hc)]),
        "valid": torch.cat([st["sel_valid"], torch.ones(P, Hc, dtype=torch.bool, device=L_a.device)]),
    }
    fk_c = spec["key_map"](_to_heads(cand["kl"], Hs)[None])[0].to(acc)  # [C, Hs, F]
    v_c = _to_heads(cand["v"], Hs).to(acc)  # [C, Hs, Dv]
    num = torch.einsum("chf,hfd->chd", fk_c, S)
    den = torch.einsum("chf,hf->ch", fk_c, z)
    pred = torch.where((den > 0)[..., None], num / torch.where(den > 0, den, torch.ones_like(den))[..., None],
                       torch.zeros_like(num))
    err = torch.linalg.vector_norm(v_c - pred, dim=-1)  # [C, Hs]
    if Hc != Hs:  # a group's pair: the norm of its state heads' errors together
        err = err.view(err.shape[0], Hc, Hs // Hc).square().sum(-1).sqrt()
    err = err.masked_fill(~cand["valid"], float("-inf"))
    # candidates are in rank order, so a stable sort breaks ties towards the earlier token
    order = torch.sort(err, dim=0, descending=True, stable=True).indices
    top = torch.zeros_like(cand["valid"]).scatter_(0, order[:G], True) & cand["valid"]  # [C, Hc]
    evict = _to_heads(cand["valid"] & ~top, Hs)
    w = fk_c * torch.exp(L_a[None] - cand["L"]) * evict[..., None].to(acc)  # [C, Hs, F]
    st["S"] = S + torch.einsum("chf,chd->hfd", w, v_c)
    st["z"] = z + w.sum(0)
    st["L_state"] = L_a
    keep = torch.sort(torch.where(top, cand["rank"], torch.full_like(cand["rank"], _LAST)), dim=0, stable=True).indices[:G]
    for name in ("k", "v", "kl", "L", "rank"):
        x, idx = cand[name], _to_heads(keep, cand[name].shape[1])
        st["sel_" + name] = torch.gather(x, 0, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(G, *x.shape[1:]))
    st["sel_valid"] = torch.gather(top, 0, keep)
    st["sel_rank"] = torch.where(st["sel_valid"], st["sel_rank"], torch.full_like(st["sel_rank"], _LAST))
    for name in (spec["recent_key"], "recent_v", "recent_kl", "recent_L"):
        st[name] = st[name][P:]


def _attend(st, a, q, fq, L, spec):
    """Queries at ranks a, a+1, ... ([n, H, D], fq [n, H, F], their cumulative gates L
    [n, Hs, Fg]) against the exact tokens and the state -> o [n, H, Dv]. Each query head reads
    its group's keys, values and state where they are (no copy per query head)."""
    n, H, _ = q.shape
    acc = st["S"].dtype
    qa = q.to(acc)
    qpos = a + torch.arange(n, device=q.device)
    start = st["seen"] - st["recent_kl"].shape[0]
    sink_rank = torch.arange(st["sink_k"].shape[0], device=q.device)
    rec_rank = start + torch.arange(st["recent_kl"].shape[0], device=q.device)
    sel_ok = st["sel_valid"].repeat_interleave(H // st["sel_valid"].shape[1], dim=1).T  # [H, G]
    allowed = torch.cat([(sink_rank[None, :] <= qpos[:, None])[:, None, :].expand(n, H, -1),
                         sel_ok[None].expand(n, H, -1),
                         (rec_rank[None, :] <= qpos[:, None])[:, None, :].expand(n, H, -1)], dim=-1)  # [n, H, N]
    exact = [(st["sink_k"], st["sink_v"]), (st["sel_k"], st["sel_v"]), (_recent_keys(st), st["recent_v"])]
    if st["sel_k"].shape[1] == st["sink_k"].shape[1]:  # the pairs per KV head too: one product
        exact = [(torch.cat([k for k, _ in exact]), torch.cat([v for _, v in exact]))]
    scores = torch.cat([_group_scores(qa, k.to(acc)) for k, _ in exact], dim=-1) * spec["scale"]
    scores = soft_cap(scores, spec["softcap"]).masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).split([k.shape[0] for k, _ in exact], dim=-1)
    o_win = sum(_group_values(pi, v.to(acc)) for pi, (_, v) in zip(p, exact))
    Hs = spec["Hs"]
    fq_d = fq.to(acc).view(n, Hs, H // Hs, -1) * torch.exp(L - st["L_state"][None])[:, :, None]  # [n, Hs, H/Hs, F]
    num = torch.einsum("qsgf,sfd->qsgd", fq_d, st["S"]).reshape(n, H, -1)
    den = torch.einsum("qsgf,sf->qsg", fq_d, st["z"]).reshape(n, H)
    return combine_past_window(o_win[None], lse[None], m[None], num[None], den[None], spec["gamma"], spec["lam"])[0]


def _group_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] against keys k [N, h, D] of h heads, each read by H / h query heads in a
    row -> [n, H, N]."""
    n, H, D = q.shape
    h = k.shape[1]
    return torch.einsum("qhgd,khd->qhgk", q.view(n, h, H // h, D), k).reshape(n, H, k.shape[0])


def _group_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Weights p [n, H, N] on values v [N, h, Dv] of h heads (as `_group_scores`) -> [n, H, Dv]."""
    n, H, N = p.shape
    h = v.shape[1]
    return torch.einsum("qhgk,khd->qhgd", p.view(n, h, H // h, N), v).reshape(n, H, v.shape[-1])


# -- the batched decode state ----------------------------------------------------------------
_ROW_TENSORS = ("sink_k", "sink_v", "recent_k", "recent_rope", "recent_v", "recent_kl", "recent_L")


def _pack(rows: list[dict], spec) -> dict:
    """Row states -> one dict of batch-first tensors (variable lengths padded, counts kept)."""
    out = {"seen": torch.tensor([r["seen"] for r in rows], device=rows[0]["S"].device)}
    for name in (n for n in _ROW_TENSORS if n in rows[0]):
        longest = max(r[name].shape[0] for r in rows)
        out[name] = torch.stack([torch.cat([r[name], r[name].new_zeros(longest - r[name].shape[0], *r[name].shape[1:])])
                                 for r in rows])
    out["sink_len"] = torch.tensor([r["sink_k"].shape[0] for r in rows], device=out["seen"].device)
    out["recent_len"] = torch.tensor([r["recent_kl"].shape[0] for r in rows], device=out["seen"].device)
    for name in ("sel_k", "sel_v", "sel_kl", "sel_L", "sel_rank", "sel_valid", "S", "z", "L_state", "L_last"):
        out[name] = torch.stack([r[name] for r in rows])
    return out


def _unpack_row(state: dict, b: int) -> dict:
    row = {name: x[b] for name, x in state.items() if name not in ("seen", "sink_len", "recent_len")}
    row["seen"] = int(state["seen"][b])
    for name in (n for n in _ROW_TENSORS if n in row):
        size = int(state["sink_len" if name.startswith("sink") else "recent_len"][b])
        row[name] = row[name][:size]
    return row
