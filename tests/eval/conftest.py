"""Tiny local models for the eval tests: a byte-level BPE tokenizer trained here and a
two-layer random Llama, saved as a plain HF folder (nothing comes from the hub)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from linearize.eval.heldout import heldout_texts
from linearize.eval.mqar import KEY_WORDS, VALUE_WORDS

SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join(f"{w} {v}" for w, v in zip(KEY_WORDS, VALUE_WORDS))
    corpus = [words] * 50 + heldout_texts(200)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def eval_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def eval_model(eval_tokenizer):
    return build_model(len(eval_tokenizer))


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory, eval_model, eval_tokenizer):
    """A plain HF folder (config, safetensors, tokenizer) of the tiny model."""
    path = tmp_path_factory.mktemp("tiny_llama")
    eval_model.save_pretrained(path)
    eval_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def linearized_dir(tmp_path_factory, eval_tokenizer):
    """A saved liger-gla conversion of the tiny model, with its tokenizer."""
    import linearize

    model = linearize.convert(build_model(len(eval_tokenizer)), linearize.LinearizeConfig(method="liger-gla"))
    path = tmp_path_factory.mktemp("tiny_linearized")
    model.save_pretrained(path)
    eval_tokenizer.save_pretrained(path)
    return path
