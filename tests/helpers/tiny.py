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
