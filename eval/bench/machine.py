"""The machine a benchmark ran on: CPUs, threads, versions, date and load, recorded in every
report so two runs can be compared."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

from linearize.kernels import ENV_VAR, select_backend


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
        info["kernel_backend"] = select_backend(torch.empty(0, device=device))
        info["kernel_backend_env"] = os.environ.get(ENV_VAR, "")
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        info["kernel_backend"] = f"unknown ({e})"
    return info
