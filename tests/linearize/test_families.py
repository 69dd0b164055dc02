"""Conformance suite: every family in FAMILIES, from a tiny random config (no downloads).

Each family must: reproduce its teacher when the window covers the sequence; decode with a
cache and left padding exactly as the full forward does; round-trip through save_pretrained
and load; unconvert to the original state dict bit for bit; and run its original attention
under `linearize.teacher`. A family without an entry in TINY_CONFIGS fails here.
"""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import linearize
from linearize import LinearizeCache, UnsupportedArchitectureError
from linearize.families import FAMILIES, NOT_SUPPORTED, family_table, local_layers

T = 20
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=False)
# What each family needs beyond BASE, with its special feature switched on and set away from
# values that would hide a mistake (a scale of 1/sqrt(D), equal RoPE bases, ...).
TINY_CONFIGS = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": {},
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "granite": dict(attention_multiplier=0.09, residual_multiplier=0.5, embedding_multiplier=3.0, logits_scaling=2.0),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window=6, rope_local_base_freq=100.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        tie_word_embeddings=True),
    # A cap of 1 with weights drawn at 0.2 (not 0.02): the scores reach several units, so the cap
    # changes the teacher's logits by ~40% (a missing cap cannot pass).
    "gemma2": dict(query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=1.0,
                   final_logit_softcapping=5.0, initializer_range=0.2, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
NEEDS_NO_PARAMS = ("window-sinks", "liger-gla")


def tiny_model(family: str, **overrides):
    """A random fp32 eval-mode model of `family` (3 layers, 4 query heads, 2 KV heads, D = 16)."""
    kwargs = {**BASE, **TINY_CONFIGS[family], **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()


def padded_batch(pads=(0, 3, 7)):
    """ids [B, T], a left-padding mask and the matching position ids."""
    ids = torch.randint(3, 128, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def logits(model, ids, mask=None, pos=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturb_new_parameters(model):
    """Move every new parameter off its initial value, so a parameter applied to the wrong head
    or token cannot pass."""
    with torch.no_grad():
        for _, p in linearize.new_parameters(model):
            p.add_(0.3 * torch.randn_like(p))


def test_every_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(FAMILIES), "a new family needs a tiny config here and must pass this suite"
    assert not set(NOT_SUPPORTED) & set(FAMILIES)


@pytest.mark.parametrize("method", ["window-sinks", "lolcats"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_window_covering_the_sequence_reproduces_the_teacher(family, method):
    model = tiny_model(family)
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    linearize.convert(model, method=method, window=T)
    perturb_new_parameters(model)  # lolcats' window factor must not matter when no key left the window
    assert linearize.mixers(model)
    valid = mask.bool()
    assert rel(logits(model, ids, mask, pos)[valid], ref[valid]) < 1e-5


@pytest.mark.parametrize("method", ["liger-gla", "lizard", "lolcats", "lolcats-norope", "gated-deltanet"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_with_left_padding_equals_the_full_forward(family, method):
    """lolcats-norope: feature maps before RoPE, as shipped, so decoding undoes each family's
    rotation on the key that leaves the window."""
    model = tiny_model(family)
    extra = dict(linear_rope=False, num_sink_tokens=1) if method == "lolcats-norope" else {}
    linearize.convert(model, method=method.removesuffix("-norope"), window=6, **extra)
    perturb_new_parameters(model)
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = LinearizeCache(model)
        P = 9
        outs = [model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], cache=cache).logits]
        for t in range(P, T):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              cache=cache).logits)
    valid = mask.bool()
    assert rel(torch.cat(outs, 1)[valid], full[valid]) < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_load_round_trip(tmp_path, family):
    model = tiny_model(family)
    linearize.convert(model, method="lizard", window=6)
    perturb_new_parameters(model)
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    assert [m.layer_idx for m in linearize.mixers(loaded)] == [m.layer_idx for m in linearize.mixers(model)]
    assert torch.equal(logits(loaded, ids, mask, pos), ref)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids, mask, pos), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_is_the_untouched_model_and_unconvert_is_bit_exact(family):
    model = tiny_model(family)
    cls = type(model)
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linearize.convert(model, method="lolcats", window=6)
    assert not torch.equal(logits(model, ids, mask, pos), ref)
    with linearize.teacher(model):
        assert torch.equal(logits(model, ids, mask, pos), ref)
    linearize.unconvert(model)
    assert type(model) is cls and not linearize.is_linearized(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, ids, mask, pos), ref)


# -- what is special about single families ---------------------------------------------------

def test_gemma3_converts_global_layers_by_default_and_local_ones_when_named():
    model = tiny_model("gemma3_text")
    local = local_layers(model.config, FAMILIES["gemma3_text"])
    assert local == [0, 2]
    linearize.convert(model, method="liger-gla")
    assert [m.layer_idx for m in linearize.mixers(model)] == [1]
    linearize.unconvert(model)
    linearize.convert(model, method="liger-gla", layers=[0, 1, 2])
    assert [m.layer_idx for m in linearize.mixers(model)] == [0, 1, 2]


def test_gemma3_local_layers_converted_with_their_window_keep_their_rope_base():
    """A local layer converted with window = sliding_window and no sinks is its teacher exactly:
    same reach, and the local RoPE base (100 here, 1e6 for global layers) it receives."""
    model = tiny_model("gemma3_text")
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    linearize.convert(model, method="window-sinks", window=model.config.sliding_window, num_sink_tokens=0,
                      layers=local_layers(model.config, FAMILIES["gemma3_text"]))
    valid = mask.bool()
    assert rel(logits(model, ids, mask, pos)[valid], ref[valid]) < 1e-5


def test_phi3_longrope_reproduces_the_teacher():
    """longrope's long factors and attention factor (T > original_max_position_embeddings) reach
    the mixers through the cos/sin the decoder passes."""
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                long_factor=[1.0 + i / 4 for i in range(8)], original_max_position_embeddings=16)
    model = tiny_model("phi3", rope_parameters=rope, original_max_position_embeddings=16)
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    linearize.convert(model, method="window-sinks", window=T)
    valid = mask.bool()
    assert rel(logits(model, ids, mask, pos)[valid], ref[valid]) < 1e-5


def test_phi3_lora_on_the_fused_projection_reaches_student_and_teacher():
    """LoRA's target name on Phi-3 is qkv_proj; the student splits the adapted output and the
    teacher sees the same adapter."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("phi3")
    linearize.convert(model, method="window-sinks", window=T)
    ids, mask, pos = padded_batch()
    plain = logits(model, ids, mask, pos)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(FAMILIES["phi3"].lora_targets),
                                                  init_lora_weights=False))
    student = logits(peft_model, ids, mask, pos)
    with linearize.teacher(model):
        teacher = logits(peft_model, ids, mask, pos)
    valid = mask.bool()
    assert rel(student[valid], plain[valid]) > 1e-3
    assert rel(student[valid], teacher[valid]) < 1e-5


def uncap(model):
    """The same model with attention soft-capping switched off in the teacher and every mixer."""
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    for m in linearize.mixers(model):
        m.softcap = None
        m._teacher_attention.attn_logit_softcapping = None
    return model


def test_gemma2_cap_reaches_every_window_and_matters():
    """The mixers read the module's cap; without it the tiny config's logits move far more than
    the suite's tolerance, so the conformance tests above do check the cap."""
    model = tiny_model("gemma2")
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    linearize.convert(model, method="window-sinks", window=T)
    assert [m.layer_idx for m in linearize.mixers(model)] == [1]
    assert all(m.softcap == 1.0 for m in linearize.mixers(model))
    valid = mask.bool()
    assert rel(logits(model, ids, mask, pos)[valid], ref[valid]) < 1e-5
    assert rel(logits(uncap(model), ids, mask, pos)[valid], ref[valid]) > 1e-2


def test_gemma2_local_layers_converted_with_their_window_reproduce_the_teacher():
    """Local layers converted with window = sliding_window and no sinks: the capped teacher
    exactly, through prefill and through cached decode (the cache's own window softmax)."""
    family = "gemma2"
    model = tiny_model(family)
    ids, mask, pos = padded_batch()
    ref = logits(model, ids, mask, pos)
    linearize.convert(model, method="window-sinks", window=model.config.sliding_window, num_sink_tokens=0,
                      layers=local_layers(model.config, FAMILIES[family]))
    valid = mask.bool()
    assert rel(logits(model, ids, mask, pos)[valid], ref[valid]) < 1e-5
    with torch.no_grad():
        cache = LinearizeCache(model)
        outs = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], cache=cache).logits]
        for t in range(5, T):
            outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              cache=cache).logits)
    assert rel(torch.cat(outs, 1)[valid], ref[valid]) < 1e-4


@pytest.mark.parametrize("method", ["liger-gla", "lolcats", "lizard"])
def test_gemma2_triton_backend_matches_torch_backend(monkeypatch, method):
    """The capped window on the Triton path (interpreter on the CPU): the capped window kernel,
    the hybrid's capped composition (liger-gla, lolcats' row max) and gradients through the cap."""
    pytest.importorskip("triton")
    model = tiny_model("gemma2")
    linearize.convert(model, method=method, window=5, layers=[0, 1, 2])
    perturb_new_parameters(model)
    ids, mask, pos = padded_batch()
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", backend)
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out[mask.bool()].pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (ref, ref_grads), (out, grads) = results
    valid = mask.bool()
    assert rel(out[valid], ref[valid]) < 1e-4
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 1e-3, name


def test_gemma2_stage1_and_stage2_steps_learn_through_the_cap():
    """Stage 1 (attention transfer on the new parameters) and stage 2 (LoRA on q/k/v, next-token
    loss) each lower their loss in a few Adam steps on a capped Gemma-2, with finite gradients."""
    from peft import LoraConfig, get_peft_model

    from linearize.mixers import AttentionTransfer

    torch.manual_seed(0)
    model = tiny_model("gemma2")
    linearize.convert(model, method="lizard", window=4, layers=[0, 1, 2])
    ids, mask, pos = padded_batch()

    def stage1_loss():
        for m in linearize.mixers(model):
            m.transfer = AttentionTransfer()
        model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return torch.stack([m.transfer.losses[0] for m in linearize.mixers(model)]).sum()

    params = [p for _, p in linearize.new_parameters(model)]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = stage1_loss()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for m in linearize.mixers(model):
        m.transfer = None

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(FAMILIES["gemma2"].lora_targets)))
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(lora, lr=1e-2)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(4):
        loss = peft_model(ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lora)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("gemma3_text", dict(head_dim=16, attn_logit_softcapping=50.0), "soft-caps the logits only under"),
    ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_settings_are_refused_with_the_reason(model_type, overrides, reason):
    kwargs = {**BASE, "num_hidden_layers": 2, **overrides}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        linearize.convert(model, method="liger-gla")
    assert not linearize.is_linearized(model)


def test_list_families_prints_every_family_and_the_refused_ones(capsys):
    from linearize.cli import main

    assert main(["convert", "--list-families"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == family_table().strip()
    for name in [*FAMILIES, *NOT_SUPPORTED]:
        assert name in out
    assert "not run" in out and "NOT SUPPORTED YET" in out


def test_full_attention_heads_in_a_layer_the_family_keeps_are_refused_before_any_swap():
    model = tiny_model("gemma3_text")
    with pytest.raises(linearize.config.ConfigError, match=r"layers \[0\] that this conversion does not linearize"):
        linearize.convert(model, method="liger-gla", full_attention_heads={0: [0]})
    assert not linearize.is_linearized(model)
    linearize.convert(model, method="liger-gla", full_attention_heads={1: [0]})
    assert [m.full_heads for m in linearize.mixers(model)] == [[0]]
