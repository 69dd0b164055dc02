"""Shared pieces of the benchmarks: machine facts, timing, peak memory, inputs and output files.

Every benchmark writes `<name>.json` (machine, settings, rows, summary), `<name>.md` (the
table and the target lines) and `<name>.png` into one folder.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROLES = ("teacher", "student")
FORMAT = "linearize-bench-1"


# -- machine -------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Facts that decide how comparable two runs are: CPUs, threads, versions, date, load."""
    import transformers

    device = torch.device(device)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        from linearize.kernels import ENV_VAR, select_backend

        info["kernel_backend"] = select_backend(torch.empty(0, device=device))
        info["kernel_backend_env"] = os.environ.get(ENV_VAR, "")
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        info["kernel_backend"] = f"unknown ({e})"
    return info


# -- timing --------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str = "cpu") -> tuple[float, object]:
    """(seconds, fn()) with the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> dict:
    """median, min, max of a list of measurements."""
    return {"median": median(xs), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}


# -- memory --------------------------------------------------------------------------------
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed at 1 MiB: big tensors go back to the OS when freed
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_memory(device: torch.device | str = "cpu") -> None:
    """Collect garbage and hand freed memory back (glibc malloc_trim, CUDA cache)."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of the code inside `with PeakMemory(device) as pm:`.

    CUDA: `torch.cuda.max_memory_allocated` above what was allocated at entry. CPU: the
    process RSS high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) above the
    RSS at entry; where that reset is refused, a thread samples the RSS every millisecond.
    After the block: `pm.peak_bytes` (above entry), `pm.base_bytes`, `pm.method`.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.base_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        release_memory(self.device)
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        self.base_bytes = _rss_bytes()
        if self._reset_hwm():
            self.method = "VmHWM"
            return self
        self.method = "rss-sampler"
        self._sampled = self.base_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _reset_hwm(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm = _vm_hwm_bytes()
        return hwm is not None and hwm <= self.base_bytes + (64 << 20)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _rss_bytes())
        else:
            peak = _vm_hwm_bytes() or _rss_bytes()
        self.peak_bytes = max(peak - self.base_bytes, 0)


# -- models and inputs ---------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_info(model: torch.nn.Module) -> dict:
    """Name, layers, heads, dtype and linearize config of a (converted) model."""
    from linearize import is_linearized
    from linearize.convert import linearize_state

    cfg = model.config
    p = next(model.parameters())
    info = {
        "name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "class": type(model).__name__,
        "parameters": sum(x.numel() for x in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": str(p.device),
    }
    if is_linearized(model):
        st = linearize_state(model)
        info["method"] = st.config.method
        info["linearize"] = st.config.to_dict()
        info["softmax_layers"] = [i for i in range(st.num_layers) if i not in set(st.layers)]
    return info


def random_ids(model: torch.nn.Module, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch_size, length] token ids drawn uniformly from the vocabulary (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=g)
    return ids.to(model_device(model))


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not enabled, file=sys.stderr)


# -- output --------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.2g}"
    return f"{x:,.{digits}f}"


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{1 if abs(n) >= 100 else 2}f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one char per column: l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def target(description: str, value: float | None, threshold: float, at: str) -> dict:
    """A target line: met is None when the length it is stated at was not measured."""
    met = None if value is None else bool(value >= threshold)
    return {"target": description, "at": at, "value": value, "threshold": threshold, "met": met}


def target_lines(targets: list[dict]) -> list[str]:
    out = []
    for t in targets:
        if t["value"] is None:
            out.append(f"target: {t['target']}: not measured ({t['at']} not in the run)")
        else:
            verdict = "met" if t["met"] else "NOT met"
            out.append(f"target: {t['target']}: {t['value']:.2f}x at {t['at']} ({verdict})")
    return out


def write_report(out_dir: str | Path, name: str, report: dict, table: str, title: str) -> dict:
    """Write `<name>.json` and `<name>.md` into out_dir; returns report with their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    if (out / f"{name}.png").is_file():
        files["plot"] = str(out / f"{name}.png")
    report = {"format": FORMAT, **report, "files": files}
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out / f"{name}.json")
    m = report.get("machine", {})
    md = [f"# {title}", "",
          f"{report['model']['name'] if 'model' in report else ''} · {m.get('device', '')} · "
          f"{m.get('cpu', '')} ({m.get('cpu_affinity', '?')} CPUs, {m.get('torch_threads', '?')} threads) · "
          f"torch {m.get('torch', '')} · transformers {m.get('transformers', '')} · {m.get('date', '')}", "",
          table, ""]
    md += [f"- {line}" for line in target_lines(report.get("targets", []))]
    if report.get("notes"):
        md += [""] + [f"{n}" for n in report["notes"]]
    if "plot" in files:
        md += ["", f"![{name}]({name}.png)"]
    (out / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
    return report


def require_linearized(model: torch.nn.Module) -> None:
    from linearize import is_linearized

    if not is_linearized(model):
        raise ValueError(f"{type(model).__name__} is not linearized: the benchmarks compare a converted model "
                         "(student) with its own softmax attention (teacher); call linearize.convert(model) first")


def ordered_roles(repeat: int) -> tuple[str, ...]:
    """Teacher first on even repeats, student first on odd ones, so drift hits both alike."""
    return ROLES if repeat % 2 == 0 else ROLES[::-1]
