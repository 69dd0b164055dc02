"""Hub ids load from the local hub cache (offline here): `linearize.load`, `generate` and the
eval model accept "org/name" as they accept a folder."""
import os
from pathlib import Path

import pytest
import torch

import linearize
from linearize.model_folder import resolve_model_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(make_tiny_model, tmp_path, monkeypatch):
    """A converted tiny model in an HF hub cache layout, as `org/tiny-linear`, hub offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-linear" / "snapshots" / COMMIT
    model = linearize.convert(make_tiny_model("llama"), method="lolcats", window=4)
    model.save_pretrained(snap)
    (cache / "models--org--tiny-linear" / "refs").mkdir()
    (cache / "models--org--tiny-linear" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return model, snap


def test_load_takes_a_hub_id_from_the_cache(fake_hub):
    model, snap = fake_hub
    assert resolve_model_folder("org/tiny-linear") == snap
    loaded = linearize.load("org/tiny-linear")
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_eval_model_checks_resolve_a_hub_id(fake_hub):
    from linearize.eval.lm_model import check_checkpoint

    _, snap = fake_hub
    assert check_checkpoint("org/tiny-linear")[0] == snap


@pytest.mark.parametrize("name, words", [("org/not-cached", ["not a hub model", "download it first"]),
                                         ("./missing/folder", ["no checkpoint at"]),
                                         ("a/b/c", ["no checkpoint at"])])
def test_unknown_names_say_both_readings(fake_hub, name, words):
    with pytest.raises(FileNotFoundError) as e:
        linearize.load(name)
    assert all(w in str(e.value) for w in words)
