"""LoLA's sparse cache in a model: what it must reproduce, what it refuses, what it costs."""
import pytest
import torch

import linearize
from linearize import LinearizeCache, LinearizeConfig
from linearize.config import ConfigError
from linearize.summary import layer_state_bytes
from tests.helpers.perturb import perturb


def test_a_cache_as_long_as_the_input_reproduces_the_teacher(make_tiny_model):
    """Nothing ever enters the state: every query sees every key exactly, whatever the
    trained parameters are."""
    model = make_tiny_model("llama")
    ids = torch.randint(1, 128, (2, 30))
    with torch.no_grad():
        teacher = model(ids).logits
        linearize.convert(model, method="lolcats", window=4, gate="scalar", sparse_cache=30, sparse_block=3)
        perturb(model, seed=1)
        student = model(ids).logits
    assert ((student - teacher).norm() / teacher.norm()) < 1e-5


def test_the_cache_changes_a_trained_model_only_beyond_the_window(make_tiny_model):
    model = perturb(linearize.convert(make_tiny_model("llama"), method="lolcats", window=4, sparse_block=1), seed=2)
    ids = torch.randint(1, 128, (1, 24))
    with torch.no_grad():
        plain = model(ids).logits
        for layer in linearize.mixers(model):
            layer.lconfig.sparse_cache = 4
        cached = model(ids).logits
    assert torch.allclose(cached[:, :4], plain[:, :4], atol=1e-5)  # nothing has left the window yet
    assert not torch.allclose(cached[:, 8:], plain[:, 8:], atol=1e-3)


@pytest.mark.parametrize("method", ["liger-gla", "lizard", "window-sinks"])
def test_methods_without_a_past_window_state_refuse_it(method):
    with pytest.raises(ConfigError, match="sparse_cache needs the past-window hybrid"):
        LinearizeConfig(method=method, sparse_cache=8).resolved()


@pytest.mark.parametrize("field, value", [("sparse_cache", -1), ("sparse_cache", 1.5), ("sparse_block", 0),
                                          ("sparse_cache", True), ("sparse_per_kv_head", "yes")])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        LinearizeConfig(method="lolcats", **{field: value})


def test_info_counts_the_cached_pairs(make_tiny_model):
    plain = linearize.convert(make_tiny_model("llama"), method="lolcats", window=4)
    cached = linearize.convert(make_tiny_model("llama"), method="lolcats", window=4, sparse_cache=8, sparse_block=4)
    a, b = (layer_state_bytes(linearize.mixers(m)[0]) for m in (plain, cached))
    mixer = linearize.mixers(cached)[0]
    assert b - a >= 8 * mixer.state_heads * 3 * mixer.head_dim * 4  # RoPE'd and unmapped keys, values
    ids = torch.randint(1, 128, (1, 40))
    with torch.no_grad():
        cache = LinearizeCache(cached)
        cached(ids, cache=cache)
    assert cache.layers[0].nbytes() <= b + 1024  # the estimate bounds what decoding holds


def test_pairs_per_kv_head_cost_what_info_says_and_change_nothing_with_a_shared_state(make_tiny_model):
    """Per KV head, each pair is stored once for its group: info's bytes fall by the pairs of
    the other query heads, decoding holds no more; with one state per KV head already
    (share_state_across_group) the option is LoLA's own cache, output for output."""
    kw = dict(method="lolcats", window=4, sparse_cache=8, sparse_block=4, linear_rope=False)
    per_head, per_kv = (perturb(linearize.convert(make_tiny_model("llama"), **kw, sparse_per_kv_head=shared), seed=5)
                        for shared in (False, True))
    per_kv.load_state_dict(per_head.state_dict())
    mixer = linearize.mixers(per_head)[0]
    assert mixer.state_heads > mixer.num_kv_heads
    saved = layer_state_bytes(mixer) - layer_state_bytes(linearize.mixers(per_kv)[0])
    assert saved == 8 * (mixer.state_heads - mixer.num_kv_heads) * (3 * mixer.head_dim * 4 + 8 + 1)
    ids = torch.randint(1, 128, (2, 40))
    with torch.no_grad():
        cache = LinearizeCache(per_kv)
        per_kv(ids[:1], cache=cache)
        assert cache.layers[0].nbytes() <= layer_state_bytes(linearize.mixers(per_kv)[0]) + 1024
        assert not torch.allclose(per_head(ids).logits, per_kv(ids).logits, atol=1e-5)
    shared = dict(kw, share_state_across_group=True)
    a, b = (perturb(linearize.convert(make_tiny_model("llama"), **shared, sparse_per_kv_head=x), seed=5)
            for x in (False, True))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_load_sets_it_and_save_keeps_it(make_tiny_model, tmp_path):
    model = perturb(linearize.convert(make_tiny_model("llama"), method="lolcats", window=4), seed=3)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(1, 128, (1, 30))
    with torch.no_grad():
        plain = linearize.load(tmp_path / "m")(ids).logits
        loaded = linearize.load(tmp_path / "m", sparse_cache=5, sparse_block=2)
        cached = loaded(ids).logits
    assert loaded.config.linearize["sparse_cache"] == 5 and loaded.config.linearize["sparse_block"] == 2
    assert not loaded.config.linearize["sparse_per_kv_head"]
    assert linearize.load(tmp_path / "m", sparse_per_kv_head=True).config.linearize["sparse_per_kv_head"]
    assert not torch.allclose(plain, cached, atol=1e-4)
    loaded.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        again = linearize.load(tmp_path / "again")(ids).logits
    assert torch.allclose(again, cached, atol=1e-6)
    linearize.set_sparse_cache(loaded, 0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain, atol=1e-6)


def test_set_sparse_cache_refuses_other_methods(make_tiny_model):
    model = linearize.convert(make_tiny_model("llama"), method="liger-gla", window=4)
    with pytest.raises(ConfigError, match="reconvert with method lolcats"):
        linearize.set_sparse_cache(model, 8)
    with pytest.raises(ConfigError, match="sparse_block"):
        linearize.set_sparse_cache(model, 0, block=0)


def test_convert_cli_takes_it_and_refuses_it_for_liger():
    from linearize.cli import build_parser, config_from_args

    args = build_parser().parse_args(["convert", "--method", "lolcats", "--sparse-cache", "16", "--sparse-block", "8"])
    config = config_from_args(args).resolved()
    assert (config.sparse_cache, config.sparse_block, config.sparse_per_kv_head) == (16, 8, False)
    for flag, value in (("--sparse-per-kv-head", True), ("--no-sparse-per-kv-head", False)):
        args = build_parser().parse_args(["convert", "--method", "lolcats", "--sparse-cache", "16", flag])
        assert config_from_args(args).resolved().sparse_per_kv_head is value
    args = build_parser().parse_args(["convert", "--method", "liger-gla", "--sparse-cache", "16"])
    with pytest.raises(ConfigError, match="sparse_cache needs"):
        config_from_args(args).resolved()


def test_a_recipe_that_trains_through_it_is_refused_before_loading():
    from linearize.distill.recipe import Recipe, RecipeError, validate

    with pytest.raises(RecipeError, match="inference-only"):
        validate(Recipe(linearize=linearize.LinearizeConfig(method="lolcats", sparse_cache=16)))
