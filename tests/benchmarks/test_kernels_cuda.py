"""The CUDA kernel benchmark, dry-run on the CPU in the Triton interpreter: the script itself
(references, checks, timing loop, report, plot, targets) works before a GPU's time is spent on it."""
import json
import os

import pytest

from linearize.eval.bench.cli_commands import kernel_benchmark

kernels_cuda = kernel_benchmark("cuda")  # benchmarks/kernels_cuda.py

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run needs TRITON_INTERPRET=1")


def test_dry_run_checks_times_and_reports(tmp_path, capsys):
    argv = ["--dry-run", "--out", str(tmp_path), "--repeats", "1", "--warmup", "0", "--check-tokens", "40"]
    assert kernels_cuda.main(argv) == 0  # every check under the bf16 tolerance
    report = json.loads((tmp_path / "kernels_cuda.json").read_text())
    (result,) = report["rows"]
    assert result["shape"] == list(kernels_cuda.DRY_RUN_SHAPE) and report["settings"]["complete"]
    assert {"gla/forward", "window/forward", "hybrid/forward", "gla_scalar/dg_scalar@40", "hybrid/dk_lin@40"} <= set(
        result["checks"])
    for name in ("sdpa", "gla", "gla_scalar", "window", "hybrid", "sdpa+gla", "window+gla"):
        row = result["timings"][name]
        assert row["error"] is None and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, (name, row)
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["hybrid fwd+bwd faster than SDPA + GLA separately"]["value"] > 0
    for name in ("kernels_cuda.md", "kernels_cuda.png"):
        assert (tmp_path / name).stat().st_size > 0
    out = capsys.readouterr().out
    assert "ours hybrid" in out and "rel. error vs fp64" in out


def test_partial_report_after_each_shape(tmp_path, monkeypatch):
    """A run cut short (the GPU lease ends) leaves the shapes it finished on disk."""
    calls = []

    def stop_after_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return {"sdpa": {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "error": None}}

    monkeypatch.setattr(kernels_cuda, "time_shape", stop_after_first)
    monkeypatch.setattr(kernels_cuda, "check_shape", lambda x, n: {"gla/forward": 1e-3})
    with pytest.raises(KeyboardInterrupt):
        kernels_cuda.run(out_dir=tmp_path, shapes=[(1, 16, 2, 8), (1, 32, 2, 8)], device="cpu", show_progress=False)
    report = json.loads((tmp_path / "kernels_cuda.json").read_text())
    assert len(report["rows"]) == 1 and report["settings"]["complete"] is False
    assert report["notes"][0].startswith("Partial: 1 of 2 shapes")


def test_without_cuda_or_interpreter_says_what_to_run(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels_cuda.main(["--dry-run"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    monkeypatch.setattr(kernels_cuda.torch.cuda, "is_available", lambda: False)
    assert kernels_cuda.main([]) == 2
    assert "kernels_cpu" in capsys.readouterr().err


def test_imports_without_lm_eval_or_datasets():
    """A bare CUDA image (torch, triton, transformers, peft; no lm-eval, datasets or gguf) can
    import the kernel benchmarks: scripts/gpu_check.sh runs there."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import importlib.abc, sys
        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("lm_eval", "datasets", "gguf"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Missing())
        import linearize
        from linearize.eval.bench.cli_commands import kernel_benchmark
        kernel_benchmark("cpu"), kernel_benchmark("cuda")
        print("imported")
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
