import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import linearize
from linearize import CheckpointError


@pytest.fixture
def saved(tmp_path, make_tiny_model):
    model = linearize.convert(make_tiny_model("llama"), method="lizard", window=4)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_config_json_carries_the_linearize_config(saved):
    path, model = saved
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "linearized_llama"
    assert cfg["linearize"]["method"] == "lizard" and cfg["linearize"]["window"] == 4
    assert linearize.LinearizeConfig.from_dict(cfg["linearize"]).resolved() == linearize.LinearizeConfig.from_dict(cfg["linearize"])


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        linearize.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        linearize.load(tmp_path)


def test_truncated_weights_fail_clearly(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        linearize.load(path)


def test_missing_mixer_weights_are_never_left_random(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    dropped = {k: v for k, v in tensors.items() if "linearize_feature_map" not in k}
    assert len(dropped) < len(tensors)
    save_file(dropped, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing_keys"):
        linearize.load(path)


def test_mismatched_config_fails_clearly(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["linearize"]["method"] = "liger-gla"
    cfg["linearize"]["gate"] = "liger"
    cfg["linearize"]["feature_map"] = "softmax"
    cfg["linearize"]["mixing"] = "fixed"
    cfg["linearize"]["num_sink_logits"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        linearize.load(path)


def test_corrupt_config_json(saved):
    path, _ = saved
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        linearize.load(path)


def test_plain_models_load_too(tmp_path, make_tiny_model):
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path, dtype=torch.float32)
    assert not linearize.is_linearized(loaded)


def test_adapter_folder_is_checked(saved, tmp_path):
    path, _ = saved
    with pytest.raises(CheckpointError, match="not a peft adapter"):
        linearize.load(path, adapter=tmp_path)


def test_nonfinite_weights_are_refused_by_name_unless_allowed(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"][0, :2] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head.weight \(2 of .*allow_nonfinite=True"):
        linearize.load(path)
    model = linearize.load(path, allow_nonfinite=True)
    assert torch.isnan(model.lm_head.weight).sum() == 2


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("linearize"), "no `linearize` field"),
    (lambda c: c["linearize"].update(method="nope"), "config.json, field `linearize`: unknown method 'nope'"),
    (lambda c: c["linearize"].update(bogus=1), "config.json, field `linearize`: unknown linearize config field"),
    (lambda c: c.update(linearize=5), "config.json, field `linearize`: a linearize config must be a JSON object"),
    (lambda c: c.update(model_type="nonsense"), "config.json, field model_type: 'nonsense'"),
    (lambda c: c.update(model_type="linearized_foo"), "config.json, field model_type: 'linearized_foo'"),
    (lambda c: c["linearize"].update(layers=[9]), "config.json, field `linearize`: layers [9] out of range"),
    (lambda c: c.pop("model_type"), "config.json has no model_type"),
    (lambda c: c.update(hidden_size=32), "lm_head.weight saved [128, 64] vs config.json [128, 32]"),
])
def test_an_edited_config_json_is_named_with_its_field(saved, change, words):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        linearize.load(path)
    assert words in str(e.value) and "truncated" not in str(e.value)


def test_auto_class_loading_names_config_json_too(saved):
    from transformers import AutoModelForCausalLM

    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["linearize"]["window"] = "abc"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json, field `linearize`: window must be an integer"):
        AutoModelForCausalLM.from_pretrained(path)
