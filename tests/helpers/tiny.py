"""Tiny random models of any family, built from a config in the test (no downloads)."""


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer random config of the given family (GQA: 4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False)
    if model_type == "qwen2":
        base["use_sliding_window"] = False
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "llama", **overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def save_tiny_model(folder, **overrides) -> None:
    """Save a 2-layer random Llama (seed 0) and a character-level tokenizer (ids = ASCII codes)
    in `folder`: a source model the CLI commands can load offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = tiny_config("llama", bos_token_id=1, eos_token_id=2, **overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
