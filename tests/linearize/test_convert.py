import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import linearize
from linearize import LinearizeConfig, UnsupportedArchitectureError
from linearize.mixers import LinearizedAttention

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", linearize.METHODS)
def test_every_family_converts_runs_backward_and_round_trips(tmp_path, make_tiny_model, family, method):
    model = make_tiny_model(family)
    linearize.convert(model, LinearizeConfig(method=method, window=8))
    assert type(model).__name__ == f"Linearized{type(model).__mro__[2].__name__}"
    ids = torch.randint(0, 128, (2, 21))
    out = model(ids, use_cache=False).logits
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for _, p in linearize.new_parameters(model):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    ref = logits(model.eval(), ids)
    assert torch.equal(logits(again, ids), ref)
    assert torch.equal(logits(loaded, ids), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_sequence_reproduces_the_teacher(make_tiny_model, family):
    model = make_tiny_model(family)
    ids = torch.randint(0, 128, (2, 24))
    ref = logits(model, ids)
    linearize.convert(model, method="window-sinks", window=24)
    assert rel(logits(model, ids), ref) < 1e-5


def test_window_with_padding_reproduces_the_teacher(make_tiny_model):
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ref = logits(model, ids, attention_mask=mask)
    linearize.convert(model, method="window-sinks", window=64)
    out = logits(model, ids, attention_mask=mask)
    valid = mask.bool()
    assert rel(out[valid], ref[valid]) < 1e-5


def test_converting_no_layers_is_exact_and_unconvert_is_bit_exact(make_tiny_model):
    model = make_tiny_model("qwen3", num_hidden_layers=3)
    ids = torch.randint(0, 128, (2, 12))
    ref = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linearize.convert(model, method="liger-gla", layers=[])
    assert torch.equal(logits(model, ids), ref)
    linearize.unconvert(model)
    linearize.convert(model, method="lizard", softmax_layers=[1])
    assert not torch.equal(logits(model, ids), ref)
    with linearize.teacher(model):
        assert torch.equal(logits(model, ids), ref)
    assert not torch.equal(logits(model, ids), ref)
    linearize.unconvert(model)
    assert type(model).__name__ == "Qwen3ForCausalLM" and not linearize.is_linearized(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), ref)


def test_inter_layer_hybrid_keeps_chosen_layers(make_tiny_model):
    model = make_tiny_model("llama", num_hidden_layers=4)
    linearize.convert(model, method="liger-gla", softmax_layers=[0, 2])
    kinds = [isinstance(layer.self_attn, LinearizedAttention) for layer in model.model.layers]
    assert kinds == [False, True, False, True]
    assert model.config.linearize["softmax_layers"] == [0, 2]


def test_projections_are_shared_not_copied(make_tiny_model):
    model = make_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    linearize.convert(model, method="lizard")
    mixer = model.model.layers[0].self_attn
    assert mixer.q_proj is attn.q_proj and mixer._teacher_attention is attn
    names = [n for n, _ in model.named_parameters()]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert all("linearize_" in n for n, _ in linearize.new_parameters(model))
    assert len(names) == len(set(names))


@pytest.mark.parametrize("method", ["liger-gla", "liger-hgrn2", "lizard", "lolcats"])
def test_gqa_shared_state_equals_repeated_kv(make_tiny_model, method):
    """A state per KV head shared by its query heads equals a state per query head whose key
    feature maps are the shared ones repeated to the group (learned maps are per query head
    when the state is)."""
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (2, 19))
    linearize.convert(model, method=method, window=4, share_state_across_group=True)
    shared = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    linearize.unconvert(model)
    linearize.convert(model, method=method, window=4, share_state_across_group=False)
    for name, p in model.state_dict().items():
        if name in state and state[name].shape != p.shape and "feature_map_k" in name:
            state[name] = state[name].repeat_interleave(p.shape[0] // state[name].shape[0], dim=0)
    model.load_state_dict(state)
    assert rel(logits(model, ids), shared) < 1e-5
    assert model.model.layers[0].self_attn.state_heads == 4


def test_unsupported_architecture_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError) as err:
        linearize.convert(model, method="liger-gla")
    msg = str(err.value)
    assert "'gpt2'" in msg and "llama" in msg and "qwen3" in msg and "mistral" in msg


def test_bad_conversion_inputs(make_tiny_model):
    model = make_tiny_model("llama")
    with pytest.raises(linearize.ConfigError, match="out of range"):
        linearize.convert(model, method="liger-gla", softmax_layers=[7])
    assert not linearize.is_linearized(model)
    with pytest.raises(linearize.ConfigError, match="unknown method"):
        linearize.convert(model, method="hyena")
    with pytest.raises(linearize.ConfigError, match="window must be"):
        linearize.convert(model, method="lizard", window=-3)
    linearize.convert(model, method="liger-gla")
    with pytest.raises(ValueError, match="already linearized"):
        linearize.convert(model, method="lizard")


def test_fresh_initialisation_is_close_to_the_teacher(make_tiny_model):
    """Learned parts start where the method allows the least damage: with the window
    covering the sequence, LoLCATs and Lizard start close to the teacher."""
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (2, 16))
    ref = logits(model, ids)
    linearize.convert(model, method="lolcats", window=16)
    assert rel(logits(model, ids), ref) < 0.05


def test_teacher_mode_sees_lora_like_the_softmax_layers(make_tiny_model):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (1, 10))
    linearize.convert(model, method="liger-gla", softmax_layers=[1])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad(), linearize.teacher(model):
        with peft_model.disable_adapter():
            plain = peft_model(ids, use_cache=False).logits
        adapted = peft_model(ids, use_cache=False).logits
    merged = peft_model.merge_and_unload()
    linearize.unconvert(merged)
    with torch.no_grad():
        after = merged(ids, use_cache=False).logits
    assert not torch.allclose(plain, adapted)
    assert torch.allclose(after, adapted, atol=1e-5)


def test_attention_transfer_leaves_padding_out(make_tiny_model):
    from linearize.mixers import AttentionTransfer

    model = linearize.convert(make_tiny_model("llama"), method="lizard", window=4)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0

    def layer_losses(batch_ids, batch_mask):
        for m in linearize.mixers(model):
            m.transfer = AttentionTransfer()
        with torch.no_grad():
            model(batch_ids, attention_mask=batch_mask, use_cache=False)
        return torch.stack([m.transfer.losses[0] for m in linearize.mixers(model)])

    both = layer_losses(ids, mask)
    row0 = layer_losses(ids[:1], mask[:1])
    row1 = layer_losses(ids[1:], mask[1:])
    assert torch.allclose(both, (12 * row0 + 7 * row1) / 19, rtol=1e-4)
