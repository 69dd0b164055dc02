"""Progress bars with an ETA on our own metrics (#13): drawn when a run turns them on and
stderr is a terminal; silent under --quiet, in pipes and for library callers."""
import io
import sys

from linearize.eval.agreement import teacher_agreement
from linearize.eval.cli_commands import add_eval_arguments, settings_from_args
from linearize.eval.mqar import mqar_accuracy
from linearize.eval.passkey import passkey_retrieval
from linearize.eval.perplexity import perplexity
from linearize.eval.progress import progress_bars, shown

TEXTS = ["the cat sat on the mat " * 20, "a b c d e f g " * 30, "one two three " * 25]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def on_a_terminal(monkeypatch) -> Terminal:
    """stderr replaced by a terminal (inside the test body: pytest's capture resets sys.stderr
    between fixture setup and the call)."""
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    return err


def run_metrics(model, tok):
    perplexity(model, tok, TEXTS, max_length=32, stride=16, batch_size=2)
    passkey_retrieval(model, tok, lengths=(160,), depths=(0.0, 1.0))
    mqar_accuracy(model, tok, num_pairs=(4,), num_samples=4, batch_size=2)


def test_bars_show_progress_and_time_left_on_a_terminal(eval_model, eval_tokenizer, monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    with progress_bars(True, label="student"):
        run_metrics(eval_model, eval_tokenizer)
    text = terminal.getvalue()
    for desc, unit in [("student perplexity", "batch"), ("student passkey", "prompt"), ("student MQAR", "sample")]:
        assert desc in text and unit in text, text[-2000:]
    assert "0/2 [00:00<" in text and "0/4 [00:00<" in text  # totals known: elapsed<remaining


def test_agreement_has_a_bar(linearized_dir, eval_tokenizer, monkeypatch):
    import linearize

    model = linearize.load(linearized_dir)
    terminal = on_a_terminal(monkeypatch)
    with progress_bars(True):
        teacher_agreement(model, None, eval_tokenizer, TEXTS, max_length=32, batch_size=2)
    assert "agreement" in terminal.getvalue()


def test_no_bars_off_a_terminal_or_unless_turned_on(eval_model, eval_tokenizer, monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    run_metrics(eval_model, eval_tokenizer)  # library call: off
    assert terminal.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress_bars(True):
        assert not shown()
        run_metrics(eval_model, eval_tokenizer)
    assert pipe.getvalue() == ""


def test_quiet_turns_the_bars_off():
    import argparse

    parser = add_eval_arguments(argparse.ArgumentParser())
    assert settings_from_args(parser.parse_args(["ckpt"])).progress is True
    assert settings_from_args(parser.parse_args(["ckpt", "--quiet"])).progress is False
