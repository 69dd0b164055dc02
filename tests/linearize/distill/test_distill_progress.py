"""Quality against budget: held-out perplexity during training, stage-1 per-layer MSE, the PNG."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.distill import DistillError, RecipeError, distill, load_recipe
from linearize.distill.metrics import evaluating, layer_mse_summary, plot_losses, plot_panels
from linearize.distill.train import heldout_layer_mse, transfer_loss
from linearize.eval.perplexity import perplexity
from linearize.mixers import AttentionTransfer



def heldout_texts() -> list[str]:
    """Eight word sequences the tiny tokenizer knows, none of them the training documents."""
    return [" ".join(f"w{(7 * i + 3 * j) % 120}" for j in range(10 + 5 * i)) for i in range(8)]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evals(log: list[dict]) -> list[tuple[int, int, int]]:
    return [(r["stage"], r["step"], r["tokens"]) for r in log if "eval_ppl" in r]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_texts()))
    return path


def eval_section(heldout: Path, **over) -> dict:
    return {"every_tokens": 64, "source": str(heldout), "texts": 6, "batch_size": 2, **over}


def lizard(assets, **cfg):
    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    linearize.convert(model, linearize.LinearizeConfig(method="lizard", window=8, **cfg))
    return model


def test_loss_reduction_mean_is_the_sum_over_layers(assets):
    model = lizard(assets)
    t = AttentionTransfer()
    for m in linearize.mixers(model):
        m.transfer = t
    batch = {"input_ids": torch.randint(3, 120, (2, 24))}
    total, per_layer = transfer_loss(model, batch, t, "sum")
    mean, per_layer2 = transfer_loss(model, batch, t, "mean")
    assert per_layer.shape == (2,) and not per_layer.requires_grad and total.requires_grad
    total, mean = total.detach(), mean.detach()
    assert torch.equal(per_layer, per_layer2)
    assert float(total) == pytest.approx(float(per_layer.sum()), rel=1e-6)
    assert float(mean) == pytest.approx(float(total) / 2, rel=1e-6)


def test_eval_records_layer_mse_and_png(write_recipe, heldout, tmp_path, capsys):
    # 32 tokens a step: evaluations at 0, 64, 128 tokens and at each stage's last step
    distill(load_recipe(write_recipe(stage1={"max_steps": 5}, stage2={"max_steps": 3},
                                     eval=eval_section(heldout), log_every=2)))
    out = tmp_path / "run"
    log = read_log(out)
    assert evals(log) == [(1, 0, 0), (1, 2, 64), (1, 4, 128), (1, 5, 160), (2, 0, 0), (2, 2, 64), (2, 3, 96)]
    assert [r["run_tokens"] for r in log if "eval_ppl" in r] == [0, 64, 128, 160, 160, 224, 256]
    assert all("loss" not in r and r["eval_ppl"] > 1 and r["eval_tokens"] > 0 for r in log if "eval_ppl" in r)
    stage1 = [r for r in log if r["stage"] == 1 and "loss" in r]
    assert [r["step"] for r in stage1] == [2, 4, 5]
    assert all(set(r["layer_mse"]) == {"0", "1"} and min(r["layer_mse"].values()) > 0 for r in stage1)
    assert not any("layer_mse" in r for r in log if r["stage"] == 2)
    held = [r["eval_layer_mse"] for r in log if r["stage"] == 1 and "eval_ppl" in r]
    assert len(held) == 4 and all(set(m) == {"0", "1"} and min(m.values()) > 0 for m in held)
    assert not any("eval_layer_mse" in r for r in log if r["stage"] == 2)
    printed = capsys.readouterr().out
    assert "stage 2 step 2 (64 tokens): held-out perplexity" in printed
    assert "stage 1 step 5 (160 tokens): held-out perplexity" in printed and "layer MSE mean" in printed
    assert "stage 1 held-out per-layer MSE, steps 0 -> 5: L0 " in printed
    assert "layers dropped by at least half" in printed
    assert plot_panels(log) == [("loss", 1), ("loss", 2), ("layer_mse", None), ("ppl", None)]
    assert (out / "loss.png").stat().st_size > 0


def spy_on_perplexity(monkeypatch) -> list[tuple[bool, bool]]:
    import linearize.eval.perplexity as ppl_module

    seen, real = [], ppl_module.perplexity

    def spy(model, *args, **kwargs):
        seen.append((model.training, torch.is_grad_enabled()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ppl_module, "perplexity", spy)
    return seen


def test_eval_perplexity_is_the_student_s_own(write_recipe, assets, heldout, monkeypatch):
    import linearize.distill.train as train

    seen = spy_on_perplexity(monkeypatch)
    modes, real_loss = [], train.transfer_loss
    monkeypatch.setattr(train, "transfer_loss", lambda model, *a: modes.append(model.training) or real_loss(model, *a))
    # layer 0 keeps softmax attention: layer_mse names the one linearized layer by its index
    lin = {"method": "lizard", "window": 8, "softmax_layers": [0]}
    final = distill(load_recipe(write_recipe(linearize=lin, stage1={"max_steps": 3}, stage2={"enabled": False},
                                             eval=eval_section(heldout, every_tokens=1000))))
    log = read_log(final.parent)
    assert evals(log) == [(1, 0, 0), (1, 3, 96)]
    assert seen == [(False, False)] * 2 and modes == [True] * 3
    assert all(set(r["layer_mse"]) == {"1"} for r in log if "loss" in r)

    tok = AutoTokenizer.from_pretrained(assets / "model")
    texts = heldout_texts()[:6]
    first, last = (r["eval_ppl"] for r in log if "eval_ppl" in r)
    torch.manual_seed(0)  # the run's seed, for the new parameters' initialisation
    fresh = lizard(assets, softmax_layers=[0]).eval()
    assert first == pytest.approx(perplexity(fresh, tok, texts, 32, 16, 2)["perplexity"], rel=1e-5)
    with linearize.teacher(fresh):
        assert first != pytest.approx(perplexity(fresh, tok, texts, 32, 16, 2)["perplexity"], rel=1e-3)
    trained = linearize.load(final).eval()
    assert last == pytest.approx(perplexity(trained, tok, texts, 32, 16, 2)["perplexity"], rel=1e-5)

    first_mse, last_mse = (r["eval_layer_mse"] for r in log if "eval_ppl" in r)
    for model, logged in ((fresh, first_mse), (trained, last_mse)):
        t = AttentionTransfer()
        for m in linearize.mixers(model):
            m.transfer = t
        assert logged == pytest.approx({str(k): v for k, v in heldout_layer_mse(model, tok, texts, 32, t).items()},
                                       rel=1e-5)


def test_resume_keeps_the_eval_records_and_the_png_follows_checkpoints(write_recipe, heldout, tmp_path, monkeypatch):
    import linearize.distill.checkpointing as checkpointing

    def recipe(name: str, out: Path) -> Path:
        return write_recipe(name, output_dir=str(out), stage1={"max_steps": 4}, stage2={"max_steps": 2},
                            checkpoint_every=2, eval=eval_section(heldout))

    straight = tmp_path / "straight"
    distill(load_recipe(recipe("a.yaml", straight)))
    real, calls = checkpointing.fsync_tree, []

    def crash_on_second_save(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during a checkpoint save")
        real(path)

    monkeypatch.setattr(checkpointing, "fsync_tree", crash_on_second_save)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        distill(load_recipe(recipe("b.yaml", killed)))
    assert plot_panels(read_log(killed))[-1] == ("ppl", None)
    assert (killed / "loss.png").stat().st_size > 0  # written at the step-2 checkpoint
    monkeypatch.setattr(checkpointing, "fsync_tree", real)
    distill(load_recipe(recipe("b.yaml", killed), ["resume=true"]))
    a, b = read_log(straight), read_log(killed)
    assert evals(b) == evals(a) == [(1, 0, 0), (1, 2, 64), (1, 4, 128), (2, 0, 0), (2, 2, 64)]
    assert [r["eval_ppl"] for r in b if "eval_ppl" in r] == pytest.approx([r["eval_ppl"] for r in a if "eval_ppl" in r],
                                                                           rel=1e-5)


def test_png_panels_and_summary_from_records(tmp_path):
    records = [{"stage": 1, "step": 0, "tokens": 0, "run_tokens": 0, "eval_ppl": 50.0},
               {"stage": 1, "step": 1, "loss": 2.0, "layer_mse": {"0": 1.0, "2": 0.5}},
               {"stage": 1, "step": 2, "loss": 1.0, "layer_mse": {"0": 0.4, "2": 0.3}},
               {"stage": 1, "step": 2, "tokens": 64, "run_tokens": 64, "eval_ppl": 30.0},
               {"stage": 2, "step": 1, "loss": 3.0}]
    assert plot_panels(records) == [("loss", 1), ("loss", 2), ("layer_mse", None), ("ppl", None)]
    assert plot_panels(records[-1:]) == [("loss", 2)]
    path = plot_losses(records, tmp_path / "loss.png")
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (800, 1200)  # 2 x 2 panels of 6 x 4 inches at 100 dpi
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert layer_mse_summary(records) == ("stage 1 training-row per-layer MSE, steps 1 -> 2: L0 1->0.4, L2 0.5->0.3; "
                                          "1/2 layers dropped by at least half")
    assert layer_mse_summary(records[-1:]) is None
    held = [{"stage": 1, "step": 0, "run_tokens": 0, "eval_ppl": 50.0, "eval_layer_mse": {"0": 2.0, "2": 0.5}},
            {"stage": 1, "step": 2, "run_tokens": 64, "eval_ppl": 30.0, "eval_layer_mse": {"0": 0.9, "2": 0.25}}]
    # two held-out measurements win over the training rows (the same text at both ends)
    assert layer_mse_summary(records + held) == ("stage 1 held-out per-layer MSE, steps 0 -> 2: L0 2->0.9, "
                                                 "L2 0.5->0.25; 2/2 layers dropped by at least half")
    assert layer_mse_summary(records + held[:1]).startswith("stage 1 training-row per-layer MSE")
    assert plot_panels(held[:1]) == [("ppl", None)]  # one measurement is no before/after
    assert plot_panels(held) == [("layer_mse", None), ("ppl", None)]
    assert plot_losses(held, tmp_path / "held.png").stat().st_size > 0


def test_heldout_layer_mse_weighs_each_text_by_its_tokens(assets):
    tok = AutoTokenizer.from_pretrained(assets / "model")
    model = lizard(assets).train()
    t = AttentionTransfer()
    for m in linearize.mixers(model):
        m.transfer = t
    texts = heldout_texts()[:3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = heldout_layer_mse(model, tok, texts, 14, t)
    assert model.training and not t.losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    per_text, counts = [], []
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"][:14]
            per_text.append(transfer_loss(model, {"input_ids": torch.tensor([ids])}, t)[1])
            counts.append(len(ids))
    want = sum(c * v for c, v in zip(counts, per_text)) / sum(counts)
    assert list(got) == [0, 1]
    assert list(got.values()) == pytest.approx(want.tolist(), rel=1e-5)
    assert counts[0] < 14 == counts[2]  # a short text counts less, a long one is cut at the window
    with pytest.raises(RecipeError, match="no held-out text has two tokens"):
        heldout_layer_mse(model, tok, ["w1"], 14, t)


@pytest.mark.parametrize("override, message", [
    ("stage1.loss_reduction=max", "stage1.loss_reduction must be one of sum, mean"),
    ("eval.every_tokens=0", "eval.every_tokens must be >= 1 or null"),
    ("eval.stages=[3]", "eval.stages must list stages 1 and/or 2"),
    ("eval.texts=0", "eval.texts must be >= 1"),
    ("eval.stride=64", "eval.stride 64 must be below eval.seq_len 32"),
    ("stage1.seq_len=1", "stage1.seq_len must be at least 2 tokens or null"),
])
def test_new_recipe_keys_are_checked(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        load_recipe(None, ["eval.seq_len=32", override] if "stride" in override else [override])


def test_eval_errors_name_the_key(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match="eval.source.*does not exist"):
        distill(load_recipe(write_recipe(eval={"every_tokens": 32, "source": str(tmp_path / "nope.jsonl")})))
    with pytest.raises(RecipeError, match="eval.stride 40 must be below the perplexity window 32"):
        distill(load_recipe(write_recipe("b.yaml", output_dir=str(tmp_path / "b"), eval={"every_tokens": 32, "stride": 40})))


def test_resume_reads_a_recipe_saved_before_the_new_keys_and_lets_eval_change(write_recipe, heldout, tmp_path,
                                                                            kill_on_save):
    import yaml

    restore = kill_on_save(2)
    path = write_recipe(stage1={"max_steps": 2}, stage2={"enabled": False}, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        distill(load_recipe(path))
    restore()
    saved = tmp_path / "run" / "recipe.yaml"  # as a run started before these keys existed wrote it
    old = yaml.safe_load(saved.read_text())
    del old["eval"], old["stage1"]["loss_reduction"]
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(DistillError, match=r"stage1.loss_reduction: 'sum' -> 'mean'"):
        distill(load_recipe(path, ["resume=true", "stage1.loss_reduction=mean"]))
    distill(load_recipe(path, ["resume=true", f"eval.source={heldout}", "eval.every_tokens=32"]))
    log = read_log(tmp_path / "run")
    resumed = [r for r in log if "resume_changes" in r]
    assert len(resumed) == 1 and resumed[0]["resume_changes"]["eval.every_tokens"] == [None, 32]
    log = [r for r in log if "resume_changes" not in r]
    assert [(r["step"], "eval_ppl" in r) for r in log] == [(1, False), (2, False), (2, True)]


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_the_mode_even_when_the_block_raises(training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train(training)
    with evaluating(model):
        assert not model.training and not model[1].training and not torch.is_grad_enabled()
    assert model.training == training and model[1].training == training and torch.is_grad_enabled()
    with pytest.raises(ValueError), evaluating(model):
        raise ValueError("stop")
    assert model.training == training and torch.is_grad_enabled()
