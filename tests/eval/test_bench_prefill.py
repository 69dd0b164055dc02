"""Prefill benchmark at toy sizes on a tiny random Llama: files, shapes of the results, memory probe."""
import importlib.util
import json
import math

import pytest
import torch

import linearize
from linearize.eval.bench.memory import PeakMemory
from linearize.eval.bench.prefill import TARGET_LENGTH, prefill_summary, prefill_table, run_prefill


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """The chunked torch kernels where they exist, else the reference ones (small shapes only)."""
    if importlib.util.find_spec("linearize.kernels.window.torch_chunk") is None:
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "naive")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_prefill_writes_table_json_and_plot(make_tiny_model, tmp_path):
    model = linearize.convert(make_tiny_model("llama"), method="liger-gla", window=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_prefill(model, tmp_path, lengths=[32, 16], repeats=2, show_progress=False)

    rows = report["rows"]
    assert [(r["length"], r["role"]) for r in rows] == [(16, "teacher"), (16, "student"), (32, "teacher"),
                                                        (32, "student")]
    for r in rows:
        assert positive(r["ms"]) and positive(r["tokens_per_s"]) and len(r["seconds"]) == 2
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0
    assert all(positive(q["speedup"]) for q in report["ratios"])
    assert report["targets"][0]["met"] is None  # 16k was not measured

    saved = json.loads((tmp_path / "prefill.json").read_text())
    assert saved["benchmark"] == "prefill" and saved["rows"] == json.loads(json.dumps(rows))
    for key in ("cpu_count", "torch", "transformers", "date", "torch_threads"):
        assert key in saved["machine"]
    assert saved["model"]["method"] == "liger-gla" and saved["model"]["layers"] == 2
    md = (tmp_path / "prefill.md").read_text()
    assert "| 16 |" in md and "| 32 |" in md and "Speedup" in md and "prefill.png" in md
    assert (tmp_path / "prefill.png").read_bytes()[:4] == b"\x89PNG"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_prefill_refuses_a_plain_model(make_tiny_model, tmp_path):
    with pytest.raises(ValueError, match="not linearized"):
        run_prefill(make_tiny_model("llama"), tmp_path, lengths=[8], repeats=1, show_progress=False)


def test_prefill_target_is_judged_at_16k():
    rows = [dict(role=role, length=n, ms=ms, tokens_per_s=n / ms, peak_mib=peak)
            for n, role, ms, peak in ((4096, "teacher", 100.0, 40.0), (4096, "student", 50.0, 10.0),
                                      (TARGET_LENGTH, "teacher", 900.0, 400.0),
                                      (TARGET_LENGTH, "student", 250.0, 20.0))]
    ratios, targets = prefill_summary(rows)
    assert [r["speedup"] for r in ratios] == [2.0, 3.6] and ratios[1]["memory_ratio"] == 20.0
    assert targets[0]["met"] is True and targets[0]["value"] == 3.6
    assert "3.60x" in prefill_table(rows) and "| 16384 |" in prefill_table(rows)


@pytest.mark.parametrize("sampler", [False, True])
def test_peak_memory_sees_a_transient_allocation(monkeypatch, sampler):
    if sampler:
        monkeypatch.setattr(PeakMemory, "_reset_hwm", lambda self: False)
    with PeakMemory("cpu") as pm:
        x = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        x.add_(1)
        if sampler:
            import time
            time.sleep(0.05)
        del x
    assert pm.method == "rss-sampler" if sampler else pm.method in ("VmHWM", "rss-sampler")
    assert 28 * 2**20 <= pm.peak_bytes < 512 * 2**20
