"""Progress bars with an ETA on converting a model (#13): `linearize convert` draws a bar over
the weight check (tensors) and over the layers it linearizes when stderr is a terminal, beside
transformers' own loading and saving bars; --quiet turns all of them off; library calls
(`linearize.convert`, `linearize.load`) stay silent."""
import io
import sys

import torch

import linearize
from linearize.model_folder import nonfinite_tensors
from linearize.cli import main
from linearize.progress import progress_bars

from helpers.tiny import tiny_model


class Terminal(io.StringIO):
    def isatty(self):
        return True


def on_a_terminal(monkeypatch) -> Terminal:
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    return err


def test_a_run_that_turns_bars_on_shows_the_layers_and_the_weight_check(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    model = tiny_model("llama", num_hidden_layers=3)
    with progress_bars(True):
        assert nonfinite_tensors(model) == []
        linearize.convert(model, method="lizard", softmax_layers=[1])
    text = terminal.getvalue()
    assert "checking weights" in text and "tensor" in text, text
    assert "linearizing layers:   0%|          | 0/2 [00:00<?, ?layer/s]" in text, text  # 2 of 3: the total is known


def test_library_calls_and_pipes_stay_silent(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    linearize.convert(tiny_model("llama"), method="lizard")
    assert terminal.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress_bars(True):
        linearize.convert(tiny_model("llama"), method="lizard")
    assert pipe.getvalue() == ""


def save_source(folder):
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(folder)


def test_convert_draws_bars_on_a_terminal_and_quiet_turns_every_bar_off(tmp_path, monkeypatch, capsys):
    save_source(tmp_path / "src")
    terminal = on_a_terminal(monkeypatch)
    assert main(["convert", str(tmp_path / "src"), "--method", "lizard", "--out", str(tmp_path / "a")]) == 0
    text = terminal.getvalue()
    for words in ("Loading weights", "checking weights", "linearizing layers", "0/2 [", "Writing model shards"):
        assert words in text, text
    terminal = on_a_terminal(monkeypatch)
    assert main(["convert", str(tmp_path / "src"), "--method", "lizard", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert terminal.getvalue() == ""
    assert "converted" in capsys.readouterr().out
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # --quiet gives transformers' bars back afterwards
    assert (tmp_path / "b" / "model.safetensors").is_file()
