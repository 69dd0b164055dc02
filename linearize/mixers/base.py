"""The shared body of every mixer: projections, RoPE, padding, the two branches, mixing.

A mixer replaces one attention module. It holds the pretrained q/k/v/o projections (and
q/k norms) by reference, so their parameters keep their original names, and keeps the
original module itself outside the module tree so the teacher can run again at any time.
New parameters live in submodules whose names start with `linearize_`.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LinearizeConfig
from ..families import Family
from ..kernels import hybrid_attention, linear_recurrence, sliding_window_attention
from ..kernels.rope import apply_rope
from ..methods import Method
from ..state import is_new_parameter
from .context import ForwardContext
from .feature_maps import build_feature_map
from .full_heads import with_full_heads
from .gates import build_gate

# Up to this many new tokens against a carried state take the step-by-step recurrence
# (decoding); longer inputs take the chunked kernels.
DECODE_STEP_TOKENS = 4
# mixing="shared-denominator": sigmoid of the per-head linear weight at initialisation, low so
# that a fresh model leans on the exact window.
SHARED_DENOMINATOR_LINEAR_WEIGHT = 0.1


class AttentionTransfer:
    """Stage-1 hook: the mixer also runs the teacher, stores the MSE and passes the teacher's
    output on, so every layer learns from the teacher's input."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def record(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
               scale: float = 1.0) -> None:
        """student, teacher: [B, T, C]; mask: [B, T] (False = padding, left out of the MSE);
        scale multiplies the MSE (LoLCATs: 1000)."""
        err = (student.float() - teacher.float()).pow(2).mean(-1)
        if mask is None:
            self.losses.append(err.mean() * scale)
            return
        self.losses.append((err * mask).sum() / mask.sum().clamp_min(1) * scale)


class LinearizedAttention(nn.Module):
    """Base mixer. Subclasses name the `Method` they implement (its preset and rules) and
    override the branches, feature maps or whole `attention` where the method computes
    otherwise; feature maps and gates come from `LinearizeConfig`."""

    method: type[Method] = Method
    # Stage 1 compares the outputs after o_proj, MSE as is; a method may compare the per-head
    # outputs before o_proj and scale the MSE, as its paper does.
    transfer_on_heads: bool = False
    transfer_scale: float = 1.0

    def __init__(self, attn: nn.Module, config: LinearizeConfig, family: Family, layer_idx: int,
                 context: ForwardContext):
        super().__init__()
        self.config = attn.config
        self.lconfig = config
        self.layer_idx = layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = attn.config.num_attention_heads
        self.num_kv_heads = attn.config.num_key_value_heads
        self.scaling = attn.scaling
        # Gemma-2's attention logit cap c * tanh(s / c) (None elsewhere): the window branch applies
        # it to its scores; the linear branch has no scores to cap (see linearize.families).
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.is_causal = True
        self.projection_names = family.projection_names
        for name in self.projection_names:
            setattr(self, name, getattr(attn, name))
        self.fused_qkv = family.fused_qkv  # one [q | k | v] projection's name, or "" (see linearize.families)
        self.qk_norm = family.qk_norm  # "", "head" or "projection" (see linearize.families)
        if family.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        object.__setattr__(self, "_teacher_attention", attn)
        # transformers 5.2x renamed the attention's cache argument (past_key_values -> cache)
        params = inspect.signature(attn.forward).parameters
        self._teacher_cache_arg = "cache" if "cache" in params else "past_key_values"
        object.__setattr__(self, "_context", context)
        self.teacher_active = False
        self.transfer: AttentionTransfer | None = None
        # Set by distillation's window dropout for one training step (linearize.distill.window_dropout).
        self.train_window: int | None = None
        # KV heads that keep exact softmax over every key (LinearizeConfig.full_attention_heads).
        config.check_full_attention_heads(self.num_kv_heads)
        self.full_heads: list[int] = list(config.full_attention_heads.get(layer_idx, []))
        self._build_branches()

    # -- construction -------------------------------------------------------------------
    def _build_branches(self) -> None:
        cfg = self.lconfig
        hidden = self.config.hidden_size
        self.has_linear = cfg.has_linear_branch
        self.has_window = cfg.has_window_branch
        state_heads = self.num_kv_heads if cfg.share_state_across_group else self.num_heads
        self.state_heads = state_heads
        if self.has_linear:
            self.linearize_feature_map_q = build_feature_map(cfg.feature_map, self.num_heads, self.head_dim, cfg.feature_dim)
            self.linearize_feature_map_k = build_feature_map(cfg.feature_map, state_heads, self.head_dim, cfg.feature_dim)
            feat = self.linearize_feature_map_k.out_dim
            if cfg.gate == "liger" and feat % self.head_dim:
                raise ValueError(f"the liger gate works per channel of the key: feature width {feat} must be a "
                                 f"multiple of head_dim {self.head_dim} (set feature_dim to head_dim)")
            self.linearize_gate = build_gate(cfg.gate, hidden_size=hidden, num_kv_heads=self.num_kv_heads,
                                             normalizer=cfg.gate_normalizer, repeat=max(feat // self.head_dim, 1),
                                             num_state_heads=state_heads, layer_idx=self.layer_idx,
                                             num_layers=self.config.num_hidden_layers)
        if self.has_window and cfg.num_sink_logits:
            # Meta-memory logits start low (exp(-5) each): the window is then almost exactly the
            # teacher's softmax, and training raises them where attention needs a sink.
            self.linearize_sink_logits = nn.Parameter(torch.full((self.num_heads, cfg.num_sink_logits), -5.0))
        if cfg.mixing == "learned":
            self.linearize_window_weight = nn.Parameter(torch.full((self.num_heads,), float(cfg.window_weight)))
            self.linearize_linear_weight = nn.Parameter(torch.full((self.num_heads,), float(cfg.linear_weight)))
        if cfg.mixing == "shared-denominator":
            p = SHARED_DENOMINATOR_LINEAR_WEIGHT
            self.linearize_linear_logit = nn.Parameter(torch.full((self.num_heads,), math.log(p / (1 - p))))
        self._build_method_parameters()

    def _build_method_parameters(self) -> None:
        """New parameters a method adds beyond the shared ones (none here)."""

    # -- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        self.sync_teacher_projections()
        if self.teacher_active:
            return self._teacher_attention(hidden_states, position_embeddings=position_embeddings,
                                           attention_mask=attention_mask, **{self._teacher_cache_arg: cache}, **kwargs)
        heads, out = self.student_forward(hidden_states, position_embeddings, cache)
        if self.transfer is not None:
            teacher, teacher_heads = self.teacher_outputs(hidden_states, position_embeddings, attention_mask, **kwargs)
            mask = self._context.key_mask(hidden_states.shape[1])
            if self.transfer_on_heads:
                self.transfer.record(heads.reshape(teacher_heads.shape), teacher_heads, mask, self.transfer_scale)
            else:
                self.transfer.record(out, teacher, mask, self.transfer_scale)
            return teacher, None
        return out, None

    def teacher_outputs(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        """The original attention's output [B, T, C] and its per-head output before o_proj
        [B, T, H * D], without gradients (stage 1's target)."""
        captured = []
        hook = self.o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                teacher, _ = self._teacher_attention(hidden_states, position_embeddings=position_embeddings,
                                                     attention_mask=attention_mask, **kwargs)
        finally:
            hook.remove()
        return teacher, captured[-1]

    def sync_teacher_projections(self) -> None:
        """Point the original attention at the mixer's current projections, so adapters that
        peft wrapped around them (or merged into them) act on the teacher too."""
        teacher = self._teacher_attention
        for name in self.projection_names:
            mine = getattr(self, name)
            if getattr(teacher, name) is not mine:
                setattr(teacher, name, mine)

    def project(self, hidden_states: torch.Tensor):
        """hidden [B, T, C] -> q [B, T, H, D], k [B, T, HKV, D], v [B, T, HKV, D] (before RoPE)."""
        B, T, _ = hidden_states.shape
        if self.fused_qkv:  # Phi-3: one projection whose output is [q | k | v]
            sizes = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)
            q, k, v = getattr(self, self.fused_qkv)(hidden_states).split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.qk_norm == "projection":  # OLMo-2: over all heads' channels, before splitting
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma-3: per head, after splitting
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def student_forward(self, hidden_states: torch.Tensor, position_embeddings, cache):
        """hidden [B, T, C] -> (per-head output [B, T, H, V] before o_proj, output [B, T, C])."""
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_mask = self._context.key_mask(T)
        cu_seqlens = self._context.cu_seqlens(B, T) if key_mask is None else None
        state = cache.linear_layer(self.layer_idx) if cache is not None and hasattr(cache, "linear_layer") else None
        o = self.attention(hidden_states, q, k, v, q_rot, k_rot, key_mask, cu_seqlens, state, rope=(cos, sin))
        if self.full_heads:
            o = with_full_heads(self, o, q_rot, k_rot, v, key_mask, cu_seqlens, state)
        if state is not None:
            state.advance(T)
        return o, self.o_proj(o.reshape(B, T, -1).to(hidden_states.dtype))

    def attention(self, hidden, q, k, v, q_rot, k_rot, key_mask, cu_seqlens, state, rope=None) -> torch.Tensor:
        """The mixing rule: q, k, v before RoPE ([B, T, H | HKV, D]), q_rot, k_rot after it,
        key_mask [B, T] or None, cu_seqlens or None, the layer's decode state or None, rope the
        rotation (cos, sin) [B, T, D]. Returns o [B, T, H, V] before o_proj."""
        lin_q, lin_k = (q_rot, k_rot) if self.lconfig.linear_rope else (q, k)
        mode = self.fused_mode()
        if mode is not None and q.shape[1] > DECODE_STEP_TOKENS and (state is None or not state.has_window_past()):
            return self.fused_branches(mode, hidden, lin_q, lin_k, k, q_rot, k_rot, v, key_mask, cu_seqlens, state)
        o_win = lse = o_lin = den = None
        if self.has_window:
            o_win, lse = self.window_branch(q_rot, k_rot, v, key_mask, cu_seqlens, state)
        if self.has_linear:
            o_lin, den = self.linear_branch(hidden, lin_q, lin_k, k, v, key_mask, cu_seqlens, state)
        return self.mix(o_win, lse, o_lin, den)

    def window_now(self, state) -> int:
        """The softmax window of this forward: the config's, or the shorter one that window
        dropout set for this training step (never while a decode state is carried)."""
        if self.train_window is not None and self.training and state is None:
            return self.train_window
        return self.lconfig.window

    # -- branches --------------------------------------------------------------------------
    def window_branch(self, q, k, v, key_mask, cu_seqlens, state):
        """Softmax over the window (and sinks). Returns o [B, T, H, D] and lse [B, T, H] (fp32)."""
        cfg = self.lconfig
        sink_logits = getattr(self, "linearize_sink_logits", None)
        if state is not None and state.has_window_past():
            o, lse, _ = state.window_attention(q, k, v, key_mask, window=cfg.window, num_sink_tokens=cfg.num_sink_tokens,
                                               sink_logits=sink_logits, scale=self.scaling, softcap=self.softcap)
            return o, lse
        o, lse = sliding_window_attention(q, k, v, window=self.window_now(state), num_sink_tokens=cfg.num_sink_tokens,
                                          sink_logits=sink_logits, scale=self.scaling, key_mask=key_mask,
                                          cu_seqlens=cu_seqlens, need_lse=cfg.mixing == "shared-denominator",
                                          softcap=self.softcap)
        if state is not None:
            state.store_window(k, v, key_mask, window=cfg.window, num_sink_tokens=cfg.num_sink_tokens)
        return o, lse

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor, k_raw: torch.Tensor):
        """phi(q) [B, T, H, F], phi(k) [B, T, Hs, F] with Hs the state's heads (keys repeated to
        the query heads first when the state is per query head); overridden by tied maps."""
        if self.state_heads != k.shape[2]:
            k = k.repeat_interleave(self.state_heads // k.shape[2], dim=2)
        return self.linearize_feature_map_q(q), self.linearize_feature_map_k(k)

    def linear_inputs(self, hidden, q, k, k_raw):
        """phi(q) [B, T, H, F], phi(k) [B, T, HKV, F] (q's dtype) and the log gate g (fp32,
        [B, T, HKV, F] or [B, T, HKV])."""
        fq, fk = self.feature_maps(q, k, k_raw)
        return fq, fk.to(fq.dtype), self.log_gate(hidden, k_raw, fk.shape[2])

    def log_gate(self, hidden, k_raw, heads: int) -> torch.Tensor:
        """The log gate g (fp32): the gate's [B, T, HKV(, F)], or zeros [B, T, heads] without one."""
        if self.linearize_gate is not None:
            return self.linearize_gate(hidden, k_raw)
        return torch.zeros(*k_raw.shape[:2], heads, dtype=torch.float32, device=k_raw.device)

    def fused_mode(self) -> str | None:
        """The hybrid kernel's mode when both branches can run in one call, else None: the
        method's linear branch is the kernel's GLA recurrence (`Method.fused_kernel`), the state
        is per KV head, and the mixing is fixed without a normalizer or shared-denominator."""
        cfg = self.lconfig
        both = self.has_window and self.has_linear and self.method.fused_kernel
        if not both or self.state_heads != self.num_kv_heads:
            return None
        if cfg.mixing == "fixed" and not cfg.normalize:
            return "mix"
        if cfg.mixing == "shared-denominator":
            return "shared"
        return None

    def fused_branches(self, mode, hidden, q, k, k_raw, q_rot, k_rot, v, key_mask, cu_seqlens, state):
        """Window and recurrence through `hybrid_attention` (one fused kernel on CUDA)."""
        cfg = self.lconfig
        fq, fk, g = self.linear_inputs(hidden, q, k, k_raw)
        if mode == "mix":
            weights = dict(w_win=float(cfg.window_weight), w_lin=float(cfg.linear_weight))
        else:
            weights = dict(c=torch.sigmoid(self.linearize_linear_logit.float()))
        o, final = hybrid_attention(q_rot, k_rot, v, fq, fk, g, window=self.window_now(state), mode=mode,
                                    num_sink_tokens=cfg.num_sink_tokens,
                                    sink_logits=getattr(self, "linearize_sink_logits", None), scale_win=self.scaling,
                                    scale_lin=1.0, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                    output_final_state=state is not None, softcap=self.softcap, **weights)
        if state is not None:
            state.recurrent = final
            state.store_window(k_rot, v, key_mask, window=cfg.window, num_sink_tokens=cfg.num_sink_tokens)
        return o

    def linear_branch(self, hidden, q, k, k_raw, v, key_mask, cu_seqlens, state):
        """Gated linear recurrence. Returns o [B, T, H, V] and, when normalized, den [B, T, H]."""
        fq, fk, g = self.linear_inputs(hidden, q, k, k_raw)
        if fk.shape[2] != self.state_heads:
            fk = fk.repeat_interleave(self.state_heads // fk.shape[2], dim=2)
        initial = state.recurrent if state is not None else None
        o, den, final = linear_recurrence(fq, fk, v, g, keep=key_mask, key_mask=key_mask,
                                          normalize=self.lconfig.normalize, cu_seqlens=cu_seqlens,
                                          initial_state=initial, output_final_state=state is not None,
                                          step=initial is not None and fq.shape[1] <= DECODE_STEP_TOKENS)
        if state is not None:
            state.recurrent = final
        return o, den

    # -- mixing ----------------------------------------------------------------------------
    def mix(self, o_win, lse, o_lin, den) -> torch.Tensor:
        """The window's output o_win [B, T, H, V] (and its lse) and the recurrence's o_lin (and
        normalizer den) combined by the config's mixing rule, looked up in `MIXING_RULES`."""
        rule = self.MIXING_RULES.get(self.lconfig.mixing)
        if rule is None:
            raise ValueError(f"unknown mixing {self.lconfig.mixing!r}")
        if o_lin is not None and den is not None:
            o_lin = o_lin.float() / den.clamp_min(1e-6).unsqueeze(-1)
        elif o_lin is not None:
            o_lin = o_lin.float()
        return rule(self, o_win, lse, o_lin, den)

    def _window_only(self, o_win, lse, lin, den):
        return o_win

    def _linear_only(self, o_win, lse, lin, den):
        return lin

    def _fixed(self, o_win, lse, lin, den):
        return self.lconfig.window_weight * o_win.float() + self.lconfig.linear_weight * lin

    def _learned(self, o_win, lse, lin, den):
        w_win = self.linearize_window_weight.float()[:, None]
        w_lin = self.linearize_linear_weight.float()[:, None]
        return w_win * o_win.float() + w_lin * lin

    def _shared_denominator(self, o_win, lse, lin, den):
        """(e^lse o_win + c num) / (e^lse + c den) as a convex combination, stable for any lse."""
        log_c = F.logsigmoid(self.linearize_linear_logit.float())
        beta = torch.sigmoid(log_c + torch.log(den.clamp_min(1e-30)) - lse.float())
        beta = torch.where(torch.isneginf(lse), torch.ones_like(beta), beta).unsqueeze(-1)
        return (1 - beta) * o_win.float() + beta * lin

    # Mixing name -> rule (o_win, lse, normalized o_lin in fp32, den) -> o. LoLCATs' rule needs
    # the window's row max and the delayed keys, so `LolcatsAttention.attention` computes it whole.
    MIXING_RULES = {"window-only": _window_only, "linear-only": _linear_only, "fixed": _fixed, "learned": _learned,
                    "shared-denominator": _shared_denominator}

    def extra_repr(self) -> str:
        c = self.lconfig
        return (f"method={self.method.name}, layer={self.layer_idx}, window={c.window}, gate={c.gate}, "
                f"feature_map={c.feature_map}, mixing={c.mixing}")

    def extra_state_bytes(self) -> int:
        """Decode-state bytes a method keeps beyond the recurrent state and the window (none here)."""
        return 0

    def rotation_state_bytes(self) -> int:
        """Decode-state bytes of RoPE rotations, equal in every layer and kept once per model
        (`cache.SharedRotations`); none here."""
        return 0

    def new_parameters(self):
        """(name, parameter) pairs of the parameters this mixer added to the model."""
        return [(n, p) for n, p in self.named_parameters() if is_new_parameter(n)]
