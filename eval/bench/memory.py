"""Peak memory of a block of code (CUDA allocator or process RSS) and handing freed memory back
to the OS between measurements (glibc mallopt / malloc_trim)."""
from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import torch

from .timing import synchronize


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
