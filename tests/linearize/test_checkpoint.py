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
