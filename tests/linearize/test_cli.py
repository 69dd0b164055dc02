import json
import subprocess
import sys

import pytest

from linearize.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "linearize.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_embedded_default_converts_offline_end_to_end(tmp_path):
    out = tmp_path / "smol"
    res = run_cli("convert", "--method", "lizard", "--softmax-layers", "0,15", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "embedded SmolLM2" in res.stdout
    assert "layers linearized   28 of 30" in res.stdout and "decode state @ 32k" in res.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "linearized_llama" and cfg["linearize"]["softmax_layers"] == [0, 15]
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "# smol" in card and "lizard" in card and "Not trained" in card and "trust_remote_code=True" in card
    assert '"softmax_layers": [\n    0,\n    15\n  ]' in card
    info = run_cli("info", str(out))
    assert info.returncode == 0 and "parameters added" in info.stdout
    gen = run_cli("generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "tokens/s" in gen.stdout and "cache" in gen.stdout


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--window", "--sinks", "--sink-logits", "--gate", "--feature-map", "--softmax-layers",
                 "--layers", "--no-state-sharing", "--out"):
        assert flag in text


@pytest.mark.parametrize("args, words", [
    (["convert", "/no/such/folder"], "no model folder at"),
    (["convert", "--window", "-2", "/no/such/folder"], "window must be an integer >= 1"),
    (["convert", "--method", "window-sinks", "--window", "0"], "window-sinks has no recurrent branch"),
    (["info", "/no/such/folder"], "no checkpoint at"),
])
def test_bad_input_exits_with_a_clear_error(capsys, args, words):
    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--method", "mamba"])
    assert "invalid choice: 'mamba'" in capsys.readouterr().err


def test_the_default_conversion_is_the_recommended_one_and_options_apply_on_top():
    from linearize.cli import build_parser, config_from_args
    from linearize.config import RECOMMENDED

    default = config_from_args(build_parser().parse_args(["convert"])).resolved()
    assert {k: getattr(default, k) for k in RECOMMENDED} == RECOMMENDED
    assert default.num_sink_tokens == 4 and default.mixing == "lolcats"
    tuned = config_from_args(build_parser().parse_args(["convert", "--sparse-cache", "0", "--gate", "none"])).resolved()
    assert (tuned.method, tuned.sparse_cache, tuned.gate, tuned.init) == ("lolcats", 0, "none", "baseline")
    liger = config_from_args(build_parser().parse_args(["convert", "--method", "liger-gla"])).resolved()
    assert (liger.method, liger.sparse_cache, liger.init, liger.gate) == ("liger-gla", 0, "paper", "liger")
    assert default.linear_rope is False
    published = config_from_args(build_parser().parse_args(["convert", "--linear-rope"])).resolved()
    assert published.linear_rope is True and published.gate == "mamba2"
    assert config_from_args(build_parser().parse_args(["convert", "--method", "lolcats"])).resolved().linear_rope
