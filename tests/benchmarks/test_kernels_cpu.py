"""The CPU kernel benchmark at toy sizes: files written, numbers finite and positive (no timing claims)."""
import json
import math

import torch

from linearize.eval.bench.cli_commands import kernel_benchmark
from helpers.threads import one_thread  # noqa: F401  (autouse, module scope)

kernels_cpu = kernel_benchmark("cpu")  # benchmarks/kernels_cpu.py

TOY = dict(heads=2, kv_heads=1, dim=8, window=8, sink_tokens=2, naive_max=48, naive_backward_max=32)


def test_run_writes_table_json_and_plot(tmp_path):
    rows = kernels_cpu.run([32, 96], tmp_path, 1, threads=[1, 2], **TOY)
    assert {(r["threads"], r["op"], r["T"]) for r in rows} == {
        (n, op, T) for n in (1, 2) for op in kernels_cpu.OPS for T in (32, 96)}
    assert torch.get_num_threads() == 1  # restored
    for r in rows:
        for key in ("chunk_ms", "naive_ms", "speedup", "chunk_fwd_bwd_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["naive_estimated"] == (r["T"] > TOY["naive_max"])
        if r["T"] <= TOY["naive_backward_max"]:
            assert math.isfinite(r["fwd_bwd_speedup"]) and r["naive_fwd_bwd_ms"] > 0
        else:
            assert r["fwd_bwd_speedup"] is None
    for name in ("kernels_cpu.json", "kernels_cpu.md", "kernels_cpu.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["settings"]["window"] == 8
    assert [t["at"] for t in saved["targets"]] == ["T=4096, 1 thread", "T=4096, 2 threads"]
    assert all(t["value"] is None for t in saved["targets"])  # T=4096 was not run
    md = (tmp_path / "kernels_cpu.md").read_text()
    assert "| 2 | GLA, per-channel gates | 96 |" in md and "(est.)" in md


def test_target_per_thread_count():
    rows = [{"threads": n, "op": "gla", "T": kernels_cpu.TARGET_LENGTH, "speedup": x} for n, x in ((1, 9.5), (2, 21.0))]
    targets = kernels_cpu.kernels_targets(rows)
    assert [(t["at"], t["met"]) for t in targets] == [("T=4096, 1 thread", False), ("T=4096, 2 threads", True)]


def test_main_without_backward(tmp_path, capsys):
    argv = ["--lengths", "16", "--repeats", "1", "--out", str(tmp_path), "--no-backward", "--heads", "2",
            "--kv-heads", "2", "--dim", "4", "--window", "4", "--threads", "1"]
    assert kernels_cpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "| sliding window + sinks | 16 |" in out and "kernels_cpu.png" in out
    rows = json.loads((tmp_path / "kernels_cpu.json").read_text())["rows"]
    assert all(r["chunk_fwd_bwd_ms"] is None and r["fwd_bwd_speedup"] is None and r["naive_basis"] == "measured"
               for r in rows)
