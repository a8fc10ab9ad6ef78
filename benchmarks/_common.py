"""Helpers the benchmark scripts share: machine naming, the environment record, JSON output
(timing is ``ibmd_fast.timing``).

Imported by the scripts in this folder as ``from _common import ...`` (a script's own folder is
on ``sys.path`` when it runs).
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# GPU names, as they appear in torch.cuda.get_device_name(), mapped to short file-name keys
_GPU_KEYS = ("h200", "h100", "a100", "l40", "a10", "t4")

__all__ = ["RESULTS", "machine_name", "resolve_device", "environment", "write_json"]


def machine_name(device: str) -> str:
    """A short name for results files: the GPU's (``h100``, ``h200``, ...) or ``cpu-<n>core``."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key in _GPU_KEYS:
            if key in name:
                return key
        return name.replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def resolve_device(device: str) -> str:
    """``ibmd_fast.device.resolve_device`` as a string (``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``)."""
    from ibmd_fast.device import resolve_device as resolve

    return str(resolve(device))


def _cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``; None if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device: str, machine: Optional[str] = None) -> dict[str, Any]:
    """What a reader needs to trust (or discount) a timing: machine, threads, load, versions."""
    import ibmd_fast
    from ibmd_fast import ops

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {
        "machine": machine or machine_name(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        # the vector instructions PyTorch's CPU kernels use here (AVX2, AVX512...): CPU timings of
        # different hosts of the same core count differ about 2x between AVX2 and AVX-512 machines
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        # other processes on the machine skew CPU timings: the 1-minute load average when recorded
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "ibmd_fast": ibmd_fast.__version__,
        "ops_backend": ops.backend(),
    }


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (a reader never sees half a file)."""
    from ibmd_fast.release import atomic_write

    text = json.dumps(payload, indent=2, default=str) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)
