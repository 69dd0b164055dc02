import json

import pytest

from linearize import ConfigError, LinearizeConfig


def test_defaults_resolve_per_method():
    liger = LinearizeConfig(method="liger-gla").resolved()
    assert (liger.window, liger.gate, liger.feature_map, liger.mixing) == (64, "liger", "softmax", "fixed")
    lizard = LinearizeConfig(method="lizard").resolved()
    assert (lizard.window, lizard.num_sink_logits, lizard.gate, lizard.feature_map) == (128, 4, "scalar", "hedgehog")
    lolcats = LinearizeConfig(method="lolcats").resolved()
    assert lolcats.mixing == "lolcats" and lolcats.window == 64 and lolcats.share_state_across_group is False
    ws = LinearizeConfig(method="window-sinks").resolved()
    assert (ws.window, ws.num_sink_tokens, ws.mixing) == (64, 4, "window-only")


def test_window_zero_gives_pure_recurrent_form():
    cfg = LinearizeConfig(method="lizard", window=0).resolved()
    assert cfg.mixing == "linear-only" and cfg.num_sink_logits == 0


def test_json_round_trip(tmp_path):
    cfg = LinearizeConfig(method="lolcats", window=32, softmax_layers=[3, 1], gate="mamba2")
    cfg.to_json_file(tmp_path / "c.json")
    back = LinearizeConfig.from_json_file(tmp_path / "c.json")
    assert back == cfg and back.softmax_layers == [1, 3]


@pytest.mark.parametrize("fields, words", [
    (dict(method="mamba"), "unknown method 'mamba'; choose one of: liger-gla"),
    (dict(window=-1), "window must be an integer >= 1"),
    (dict(window=2.5), "window must be an integer"),
    (dict(method="window-sinks", window=0), "window-sinks has no recurrent branch"),
    (dict(gate="rwkv"), "unknown gate"),
    (dict(method="liger-hgrn2", gate="scalar"), "supports gate in (liger)"),
    (dict(feature_map="relu"), "unknown feature_map"),
    (dict(softmax_layers=[-1]), "softmax_layers must be a list of non-negative layer indices"),
    (dict(layers=[1, 2], softmax_layers=[2]), "listed both"),
    (dict(method="window-sinks", feature_map="hedgehog"), "no linear branch"),
    (dict(lolcats_init_window_factor=1.5), "lolcats_init_window_factor"),
    (dict(init="zero"), "unknown init 'zero'"),
    (dict(share_state_across_group="no"), "share_state_across_group must be true or false"),
    (dict(linear_weight=float("inf")), "linear_weight must be a finite number"),
    (dict(method="lizard", mixing="lolcats"), "LoLCATs' own rule"),
])
def test_bad_fields_name_the_problem(fields, words):
    with pytest.raises(ConfigError, match=None) as err:
        LinearizeConfig(**fields)
    assert words in str(err.value)


@pytest.mark.parametrize("fields, words", [
    (dict(method="liger-gla", window=0, init="baseline"), "needs a window branch"),
    (dict(method="liger-gla", mixing="shared-denominator", normalize=True, init="baseline"), "cannot start at 0"),
    (dict(method="lolcats", normalize=False), "needs the recurrence's normalizer"),
])
def test_bad_combinations_fail_on_resolve(fields, words):
    with pytest.raises(ConfigError) as err:
        LinearizeConfig(**fields).resolved()
    assert words in str(err.value)


def test_baseline_init_fields():
    liger = LinearizeConfig(method="liger-gla", init="baseline").resolved()
    assert (liger.mixing, liger.window_weight, liger.linear_weight, liger.num_sink_tokens) == ("learned", 1.0, 0.0, 4)
    lizard = LinearizeConfig(method="lizard", init="baseline", num_sink_tokens=2).resolved()
    assert (lizard.num_sink_tokens, lizard.num_sink_logits) == (2, 0)
    assert LinearizeConfig(method="lolcats", init="baseline").resolved().num_sink_tokens == 4
    again = LinearizeConfig.from_dict(lizard.to_dict()).resolved()
    assert again == lizard


def test_config_of_the_old_lolcats_is_refused():
    with pytest.raises(ConfigError, match="reconvert"):
        LinearizeConfig.from_dict({"method": "lolcats", "lolcats_init_linear_weight": 0.1})


def test_unknown_field_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown linearize config field"):
        LinearizeConfig.from_dict({"method": "lizard", "windw": 3})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LinearizeConfig.from_json_file(tmp_path / "bad.json")


def test_layer_index_out_of_range():
    with pytest.raises(ConfigError, match="out of range: the model has 2 layers"):
        LinearizeConfig(softmax_layers=[5]).linearized_layers(2)
    assert LinearizeConfig(softmax_layers=[0]).linearized_layers(3) == [1, 2]
    assert json.loads(json.dumps(LinearizeConfig().to_dict()))["method"] == "liger-gla"
