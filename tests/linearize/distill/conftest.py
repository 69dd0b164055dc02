"""Tiny local assets for the distill tests: a word-level tokenizer, a 2-layer random Llama
saved as a Hugging Face folder, and small text / alpaca data files (nothing from the hub)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(120)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS, "###", ":", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _documents(n: int, seed: int) -> list[str]:
    """Word sequences with a learnable pattern (each word tends to be followed by the next)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        w = rng.randrange(len(WORDS))
        words = []
        for _ in range(rng.randint(8, 60)):
            words.append(WORDS[w])
            w = (w + 1) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
        docs.append(" ".join(words))
    return docs


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Folder with model/ (tiny Llama + tokenizer), docs.jsonl, alpaca.json, empty.jsonl."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("distill-assets")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "docs.jsonl", "w") as f:
        for d in _documents(300, 0):
            f.write(json.dumps({"text": d}) + "\n")
    docs = _documents(60, 1)
    alpaca = [{"instruction": d.split()[0] + " " + d.split()[1], "input": "" if i % 2 else d.split()[2],
               "output": " ".join(d.split()[3:])} for i, d in enumerate(docs)]
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    (root / "empty.jsonl").write_text("")
    return root


@pytest.fixture
def write_recipe(assets, tmp_path):
    """write_recipe(**sections) -> path of a small recipe (tiny model, lizard, seq_len 32)."""

    def write(name: str = "recipe.yaml", **over) -> Path:
        tree = {
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(assets / "model")},
            "linearize": {"method": "lizard", "window": 8},
            "data": {"source": str(assets / "docs.jsonl")},
            "seq_len": 32,
            "stage1": {"max_steps": 2, "optimizer": {"lr": 1e-2}},
            "stage2": {"max_steps": 2, "optimizer": {"lr": 1e-3}},
            "progress": False,
        }
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(tree.get(key), dict):
                tree[key] = {**tree[key], **value}
            else:
                tree[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path

    return write



@pytest.fixture
def kill_on_save(monkeypatch):
    """kill_on_save(n): the n-th checkpoint save is killed (KeyboardInterrupt) while its folder
    is being synced; calling the returned function puts the real save back."""
    import linearize.distill.checkpointing as checkpointing

    real = checkpointing.fsync_tree

    def arm(n: int):
        calls = []

        def killed(path):
            calls.append(path)
            if len(calls) == n:
                raise KeyboardInterrupt(f"simulated kill during checkpoint save {n}")
            real(path)

        monkeypatch.setattr(checkpointing, "fsync_tree", killed)
        return lambda: monkeypatch.setattr(checkpointing, "fsync_tree", real)

    return arm
