"""LoLCATs against its published code's formula (HazyResearch/lolcats,
`linear_window_attention_sw.py`: `get_masks` and `hybrid_attention_quadratic`), written here
as they are there (quadratic masks from `tril`, keys repeated per query head before the
feature maps), and compared with a converted layer in fp64."""
import torch

import linearize
from linearize.mixers import AttentionTransfer
from linearize.state import linearize_state


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def hedgehog(x, weight):
    """x [B, H, T, D], weight [H, D, F] -> [B, H, T, 2F]."""
    z = torch.einsum("hdf,bhtd->bhtf", weight, x)
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)


def published_layer(mixer, hidden, cos, sin, window):
    """The published sliding-window hybrid of one layer, output after o_proj [B, T, C]."""
    B, T, _ = hidden.shape
    H, HKV, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = mixer.q_proj(hidden).view(B, T, H, D).transpose(1, 2)
    k = mixer.k_proj(hidden).view(B, T, HKV, D).transpose(1, 2).repeat_interleave(H // HKV, dim=1)
    v = mixer.v_proj(hidden).view(B, T, HKV, D).transpose(1, 2).repeat_interleave(H // HKV, dim=1)
    q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    f_q = hedgehog(q, mixer.linearize_feature_map_q.weight)
    f_k = hedgehog(k, mixer.linearize_feature_map_k.weight)
    causal = torch.ones(T, T).tril(0)
    linear_mask = torch.ones(T, T).tril(-window)
    window_mask = causal - linear_mask
    a_sm = torch.einsum("bhmd,bhnd->bhmn", q, k) * D ** -0.5
    a_sm = a_sm.masked_fill(~window_mask.bool(), -1e8)
    a_sm_max = torch.amax(a_sm, dim=-1, keepdim=True)
    window_factor = torch.sigmoid(mixer.linearize_window_logit)[None, :, None, None]
    a_sm = window_factor * torch.exp(a_sm - a_sm_max)
    sum_sm = a_sm.sum(dim=-1, keepdim=True)
    a_ln = torch.einsum("bhmd,bhnd->bhmn", f_q, f_k).masked_fill(~linear_mask.bool(), 0)
    sum_ln = a_ln.sum(dim=-1, keepdim=True)
    y = torch.einsum("bhmn,bhnd->bhmd", a_sm + a_ln, v) / (sum_sm + sum_ln)
    return mixer.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def setup(make_tiny_model, T=23, window=5):
    model = make_tiny_model("llama").double()
    linearize.convert(model, method="lolcats", window=window)
    mixer = model.model.layers[0].self_attn
    with torch.no_grad():
        mixer.linearize_window_logit.copy_(torch.randn(mixer.num_heads, dtype=torch.float64))
    hidden = torch.randn(2, T, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(T)[None].expand(2, T)
    cos, sin = model.model.rotary_emb(hidden, pos)
    return model, mixer, hidden, cos, sin


def test_layer_equals_published_formula_forward_and_gradients(make_tiny_model):
    model, mixer, hidden, cos, sin = setup(make_tiny_model)
    ours, _ = mixer(hidden, position_embeddings=(cos, sin), attention_mask=None)
    ref = published_layer(mixer, hidden, cos, sin, window=5)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-12
    params = [hidden, mixer.linearize_feature_map_q.weight, mixer.linearize_feature_map_k.weight,
              mixer.linearize_window_logit, mixer.q_proj.weight]
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-10


def test_published_defaults(make_tiny_model):
    model, mixer, *_ = setup(make_tiny_model)
    cfg = linearize_state(model).config
    assert (cfg.window, cfg.num_sink_tokens, cfg.gate, cfg.linear_rope) == (5, 0, "none", True)
    fresh = make_tiny_model("llama")
    linearize.convert(fresh, method="lolcats")
    m = fresh.model.layers[0].self_attn
    assert torch.allclose(torch.sigmoid(m.linearize_window_logit), torch.full((4,), 0.1))
    assert m.linearize_feature_map_k.weight.shape[0] == m.num_heads  # one key map per query head
    bound = (6 / (m.head_dim * m.head_dim)) ** 0.5  # kaiming_uniform_ on [H, D, F]
    weight = m.linearize_feature_map_q.weight
    assert weight.abs().max() <= bound and weight.std() > bound / 3
    assert not hasattr(m, "linearize_linear_factor")


def test_stage1_matches_heads_before_o_proj_times_1000(make_tiny_model):
    model, mixer, hidden, cos, sin = setup(make_tiny_model)
    transfer = AttentionTransfer()
    mixer.transfer = transfer
    out, _ = mixer(hidden, position_embeddings=(cos, sin), attention_mask=None)
    mixer.transfer = None
    with linearize.teacher(model):
        teacher_out, _ = mixer(hidden, position_embeddings=(cos, sin), attention_mask=None)
    assert torch.equal(out, teacher_out)  # the teacher's output is passed on
    heads, _ = mixer.student_forward(hidden, (cos, sin), None)
    captured = []
    hook = mixer.o_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    with linearize.teacher(model):
        mixer(hidden, position_embeddings=(cos, sin), attention_mask=None)
    hook.remove()
    want = 1000 * (heads.reshape(captured[0].shape) - captured[0]).pow(2).mean()
    assert torch.allclose(transfer.losses[0].double(), want, rtol=1e-6)
