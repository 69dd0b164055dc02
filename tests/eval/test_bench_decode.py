"""Decode benchmark at toy sizes on a tiny random Llama: files, per-token times, cache bytes."""
import importlib.util
import json
import math

import pytest

import linearize
from linearize.eval.bench.decode import TARGET_CONTEXT, decode_summary, decode_table, run_decode


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """The chunked torch kernels where they exist, else the reference ones (small shapes only)."""
    if importlib.util.find_spec("linearize.kernels.window.torch_chunk") is None:
        monkeypatch.setenv("LINEARIZE_KERNEL_BACKEND", "naive")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_decode_writes_table_json_and_plot(make_tiny_model, tmp_path):
    model = linearize.convert(make_tiny_model("llama"), method="liger-gla", window=8)
    report = run_decode(model, tmp_path, contexts=[40, 12], steps=3, warmup=1, prefill_chunk=16,
                        show_progress=False)

    rows = {(r["context"], r["role"]): r for r in report["rows"]}
    assert sorted(rows) == [(12, "student"), (12, "teacher"), (40, "student"), (40, "teacher")]
    for r in rows.values():
        assert positive(r["ms_per_token"]) and positive(r["tokens_per_s"]) and positive(r["prefill_s"])
        assert positive(r["cache_bytes"]) and len(r["step_ms"]) == 3
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert rows[12, "teacher"]["cache_bytes"] == 12 * kv_per_token
    assert rows[40, "teacher"]["cache_bytes"] == 40 * kv_per_token
    assert rows[12, "student"]["cache_bytes"] == rows[40, "student"]["cache_bytes"]  # both past the window
    ratios = {q["context"]: q for q in report["ratios"]}
    assert ratios[40]["cache_ratio"] > ratios[12]["cache_ratio"] > 0 and positive(ratios[40]["speedup"])
    assert [t["met"] for t in report["targets"]] == [None, None]

    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["benchmark"] == "decode" and saved["settings"]["prefill_chunk"] == 16
    assert "cpu_count" in saved["machine"] and "transformers" in saved["machine"]
    md = (tmp_path / "decode.md").read_text()
    assert "| 12 |" in md and "| 40 |" in md and "Cache ratio" in md
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_on_a_hybrid_counts_the_softmax_layer_cache(make_tiny_model, tmp_path):
    model = linearize.convert(make_tiny_model("llama", num_hidden_layers=3), method="lizard", window=4,
                              softmax_layers=[1])
    report = run_decode(model, tmp_path, contexts=[6, 20], steps=2, warmup=0, prefill_chunk=8, show_progress=False)
    student = {r["context"]: r["cache_bytes"] for r in report["rows"] if r["role"] == "student"}
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert student[20] - student[6] == 14 * per_token  # only the kept softmax layer grows


def test_decode_targets_are_judged_at_16k():
    rows = [dict(role=role, context=TARGET_CONTEXT, ms_per_token=ms, cache_bytes=b, cache_mib=b / 2**20,
                 prefill_s=1.0) for role, ms, b in (("teacher", 40.0, 400 * 2**20), ("student", 10.0, 2**20))]
    ratios, targets = decode_summary(rows)
    assert ratios[0]["speedup"] == 4.0 and ratios[0]["cache_ratio"] == 400.0
    assert [t["met"] for t in targets] == [True, True]
    assert "400.0x" in decode_table(rows)
