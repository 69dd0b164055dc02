"""`linearize bench` argument handling and dispatch, called directly on a tiny saved model."""
import argparse
import importlib.util
import json
import sys
import types

import pytest

import linearize
from linearize.eval.bench import cli_commands
from linearize.eval.bench.cli_commands import add_bench_arguments, run_bench


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """The chunked torch kernels where they exist, else the reference ones (small shapes only)."""
    if importlib.util.find_spec("linearize.kernels.window.torch_chunk") is None:
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "naive")


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-in benchmarks/kernels_cpu.py recording its calls (the real one is tested in tests/benchmarks)."""
    calls = []

    def run(lengths, out_dir, repeats=5):
        calls.append((list(lengths), out_dir, repeats))
        (out_dir / "kernels.md").write_text("| op | ms |\n")
        return "| op | ms |"

    module = types.ModuleType("kernels_cpu")
    module.run = run
    monkeypatch.setattr(cli_commands, "kernel_benchmark", lambda kind: module)
    return calls


def parse(*argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    path = tmp_path_factory.mktemp("tiny_plain")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def test_lengths_accept_k_suffix():
    args = parse("decode", "--lengths", "1k, 4k,100")
    assert args.lengths == [1024, 4096, 100] and args.which == "decode"
    with pytest.raises(SystemExit):
        parse("decode", "--lengths", "abc")


def test_prefill_from_a_plain_folder_with_a_json_config(plain_dir, tmp_path, capsys):
    out = tmp_path / "p"
    rc = run_bench(parse("prefill", "--model", str(plain_dir), "--config", '{"method": "lizard", "window": 4}',
                         "--lengths", "8,16", "--repeats", "1", "--out", str(out), "--no-progress"))
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"prefill.json", "prefill.md", "prefill.png"}
    saved = json.loads((out / "prefill.json").read_text())
    assert saved["model"]["method"] == "lizard" and saved["model"]["linearize"]["window"] == 4
    printed = capsys.readouterr().out
    assert "| 16 |" in printed and "target: prefill" in printed and "not measured" in printed


def test_all_runs_every_benchmark_into_subfolders(plain_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_commands, "BENCHMARKS_DIR", tmp_path / "absent")  # an installed wheel: skipped
    monkeypatch.delitem(sys.modules, "linearize_benchmarks_kernels_cpu", raising=False)
    rc = run_bench(parse("all", "--model", str(plain_dir), "--method", "window-sinks", "--lengths", "8",
                         "--repeats", "1", "--prefill-chunk", "4", "--out", str(tmp_path), "--no-progress",
                         "--device", "cpu"))
    assert rc == 0 and "kernels: skipped" in capsys.readouterr().err
    for name in ("prefill", "decode", "train"):
        assert (tmp_path / name / f"{name}.json").is_file() and (tmp_path / name / f"{name}.png").is_file()
    assert "target: decode" in (tmp_path / "summary.md").read_text()
    assert run_bench(parse("kernels", "--out", str(tmp_path), "--device", "cpu")) == 2


def test_kernels_needs_no_model_and_uses_the_module_defaults(tmp_path, fake_kernels, capsys):
    assert run_bench(parse("kernels", "--out", str(tmp_path), "--lengths", "64,128", "--device", "cpu")) == 0
    assert fake_kernels == [([64, 128], tmp_path, 5)]
    assert "| op | ms |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def linearized_dir(plain_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny_linearized")
    model = linearize.convert(AutoModelForCausalLM.from_pretrained(plain_dir), method="liger-gla", window=4)
    model.save_pretrained(path)
    return path


def test_a_linearized_folder_is_benchmarked_as_saved(linearized_dir, tmp_path):
    rc = run_bench(parse("decode", "--model", str(linearized_dir), "--lengths", "8", "--repeats", "1",
                         "--out", str(tmp_path), "--no-progress"))
    assert rc == 0
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["model"]["method"] == "liger-gla" and saved["model"]["linearize"]["window"] == 4


def test_check_fails_when_a_measured_target_is_missed(plain_dir, tmp_path, monkeypatch):
    from linearize.eval.bench import prefill

    monkeypatch.setattr(prefill, "TARGET_LENGTH", 8)
    monkeypatch.setattr(prefill, "TARGET_SPEEDUP", 1e9)
    argv = ["prefill", "--model", str(plain_dir), "--lengths", "8", "--repeats", "1", "--out", str(tmp_path),
            "--no-progress"]
    assert run_bench(parse(*argv, "--check")) == 1
    assert json.loads((tmp_path / "prefill.json").read_text())["targets"][0]["met"] is False


def test_bad_input_returns_2(plain_dir, linearized_dir, tmp_path, capsys):
    linearized = linearized_dir
    assert run_bench(parse("prefill", "--model", str(linearized), "--method", "lizard", "--out", str(tmp_path))) == 2
    assert "already linearized" in capsys.readouterr().err
    assert run_bench(parse("prefill", "--model", str(plain_dir), "--method", "lizard", "--config", "{}")) == 2
    assert run_bench(parse("prefill", "--model", str(plain_dir), "--config", str(tmp_path / "nope.json"))) == 2
    assert run_bench(parse("decode", "--model", str(plain_dir), "--repeats", "0")) == 2
