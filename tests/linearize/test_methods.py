"""The method registry: each method's preset, rules and attention layer, and the resolved
configs it makes (frozen: a converted model's `linearize` section must not change)."""
from __future__ import annotations

import pytest

import linearize
from linearize.config import METHOD_DEFAULTS, ConfigError, LinearizeConfig
from linearize.methods import REGISTRY, Method
from linearize.mixers import MIXERS

# LinearizeConfig(method=m, **VARIANTS[v]).resolved().to_dict(), as each method resolved when
# the presets moved into `linearize.methods`.
VARIANTS = {"default": {}, "window0": dict(window=0), "baseline": dict(init="baseline")}
FROZEN = {
    'liger-gla': {
        'default': dict(method='liger-gla', window=64, num_sink_tokens=0, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='fixed', window_weight=0.5, linear_weight=0.5,
                normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='liger-gla', window=0, num_sink_tokens=0, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='liger-gla', window=64, num_sink_tokens=4, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='learned', window_weight=1.0, linear_weight=0.0,
                normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'liger-hgrn2': {
        'default': dict(method='liger-hgrn2', window=64, num_sink_tokens=0, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='fixed', window_weight=0.5, linear_weight=0.5,
                normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='liger-hgrn2', window=0, num_sink_tokens=0, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='liger-hgrn2', window=64, num_sink_tokens=4, num_sink_logits=0, gate='liger',
                feature_map='softmax', feature_dim=None, mixing='learned', window_weight=1.0, linear_weight=0.0,
                normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'lizard': {
        'default': dict(method='lizard', window=128, num_sink_tokens=0, num_sink_logits=4, gate='scalar',
                feature_map='hedgehog', feature_dim=None, mixing='learned', window_weight=0.5, linear_weight=0.5,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='lizard', window=0, num_sink_tokens=0, num_sink_logits=0, gate='scalar',
                feature_map='hedgehog', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='lizard', window=128, num_sink_tokens=4, num_sink_logits=0, gate='scalar',
                feature_map='hedgehog', feature_dim=None, mixing='learned', window_weight=1.0, linear_weight=0.0,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'lolcats': {
        'default': dict(method='lolcats', window=64, num_sink_tokens=0, num_sink_logits=0, gate='none',
                feature_map='hedgehog', feature_dim=None, mixing='lolcats', window_weight=0.5, linear_weight=0.5,
                normalize=True, linear_rope=True, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=False, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='lolcats', window=0, num_sink_tokens=0, num_sink_logits=0, gate='none',
                feature_map='hedgehog', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=True, linear_rope=True, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=False, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='lolcats', window=64, num_sink_tokens=4, num_sink_logits=0, gate='none',
                feature_map='hedgehog', feature_dim=None, mixing='lolcats', window_weight=0.5, linear_weight=0.5,
                normalize=True, linear_rope=True, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=False, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'gated-deltanet': {
        'default': dict(method='gated-deltanet', window=64, num_sink_tokens=4, num_sink_logits=0,
                gate='mamba2', feature_map='l2', feature_dim=None, mixing='learned', window_weight=0.5,
                linear_weight=0.5, normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='gated-deltanet', window=0, num_sink_tokens=0, num_sink_logits=0,
                gate='mamba2', feature_map='l2', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='gated-deltanet', window=64, num_sink_tokens=4, num_sink_logits=0,
                gate='mamba2', feature_map='l2', feature_dim=None, mixing='learned', window_weight=1.0,
                linear_weight=0.0, normalize=False, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1,
                init='baseline', sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'lightning': {
        'default': dict(method='lightning', window=64, num_sink_tokens=4, num_sink_logits=0, gate='lightning',
                feature_map='softmax', feature_dim=None, mixing='fixed', window_weight=0.5, linear_weight=0.5,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='lightning', window=0, num_sink_tokens=0, num_sink_logits=0, gate='lightning',
                feature_map='softmax', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='lightning', window=64, num_sink_tokens=4, num_sink_logits=0, gate='lightning',
                feature_map='softmax', feature_dim=None, mixing='learned', window_weight=1.0, linear_weight=0.0,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'based': {
        'default': dict(method='based', window=64, num_sink_tokens=4, num_sink_logits=0, gate='none',
                feature_map='taylor', feature_dim=None, mixing='learned', window_weight=0.5, linear_weight=0.5,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'window0': dict(method='based', window=0, num_sink_tokens=0, num_sink_logits=0, gate='none',
                feature_map='taylor', feature_dim=None, mixing='linear-only', window_weight=0.5,
                linear_weight=0.5, normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None,
                softmax_layers=[], share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper',
                sparse_cache=0, sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='based', window=64, num_sink_tokens=4, num_sink_logits=0, gate='none',
                feature_map='taylor', feature_dim=None, mixing='learned', window_weight=1.0, linear_weight=0.0,
                normalize=True, linear_rope=False, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },
    'window-sinks': {
        'default': dict(method='window-sinks', window=64, num_sink_tokens=4, num_sink_logits=0, gate='none',
                feature_map='none', feature_dim=None, mixing='window-only', window_weight=0.5, linear_weight=0.5,
                normalize=False, linear_rope=True, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='paper', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
        'baseline': dict(method='window-sinks', window=64, num_sink_tokens=4, num_sink_logits=0, gate='none',
                feature_map='none', feature_dim=None, mixing='window-only', window_weight=0.5, linear_weight=0.5,
                normalize=False, linear_rope=True, gate_normalizer=16.0, layers=None, softmax_layers=[],
                share_state_across_group=True, lolcats_init_window_factor=0.1, init='baseline', sparse_cache=0,
                sparse_block=64, sparse_per_kv_head=False, full_attention_heads={}),
    },}


@pytest.mark.parametrize("method, variant", [(m, v) for m in FROZEN for v in FROZEN[m]])
def test_resolved_configs_are_frozen(method, variant):
    assert LinearizeConfig(method=method, **VARIANTS[variant]).resolved().to_dict() == FROZEN[method][variant]


def test_registry_names_every_method_once_with_its_layer():
    assert tuple(REGISTRY) == linearize.METHODS == tuple(FROZEN)
    assert MIXERS.keys() == REGISTRY.keys()
    for name, method in REGISTRY.items():
        assert issubclass(method, Method) and method.name == name
        assert MIXERS[name].method is method
        assert METHOD_DEFAULTS[name] is method.preset


def test_validation_asks_the_method(monkeypatch):
    class Strict(Method):
        name = "lizard"
        preset = REGISTRY["lizard"].preset

        @classmethod
        def window_problem(cls, cfg):
            return "strict: no window 32" if cfg.window == 32 else None

    cfg = LinearizeConfig(method="lizard", window=32)
    monkeypatch.setitem(REGISTRY, "lizard", Strict)
    with pytest.raises(ConfigError, match="strict: no window 32"):
        cfg.validate()


@pytest.mark.parametrize("fields, words", [
    (dict(method="gated-deltanet", feature_map="hedgehog"), "'l2' is gated-deltanet's own"),
    (dict(method="lizard", feature_map="l2"), "'l2' is gated-deltanet's own"),
    (dict(method="gated-deltanet", normalize=True), "has no normalizer"),
    (dict(method="window-sinks", mixing="fixed"), "only supports mixing='window-only'"),
    (dict(method="liger-gla", feature_map="none"), "liger-gla needs a feature map"),
])
def test_method_rules(fields, words):
    with pytest.raises(ConfigError) as err:
        LinearizeConfig(**fields)
    assert words in str(err.value)


def test_fused_kernel_is_the_methods_choice():
    assert not REGISTRY["gated-deltanet"].fused_kernel
    assert all(m.fused_kernel for name, m in REGISTRY.items() if name != "gated-deltanet")


@pytest.mark.parametrize("fields, window", [(dict(method="lizard"), True), (dict(method="lizard", window=0), False),
                                            (dict(method="liger-gla", window=8, mixing="linear-only"), False)])
def test_window_branch_is_decided_by_the_config(fields, window):
    cfg = LinearizeConfig(**fields).resolved()
    assert cfg.has_window_branch is window and cfg.has_linear_branch
