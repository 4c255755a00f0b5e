"""What several benchmarks measure and record alike."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from workers.models.cpu import cpu_info  # torch-free


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(threads: int | None = None) -> dict[str, Any]:
    """The machine a result was measured on: CPU model and flags (native bf16 or not), cores, torch's
    version and threads, the load average (1, 5, 15 minutes) now, Python and the platform.

    ``threads``: the torch threads the benchmark ran with; default torch's own count when torch is
    imported in this process, else None (torch is not imported for this)."""
    cpu = cpu_info()
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    try:
        torch_version: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    if "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    return {
        "cpu_model": cpu.model,
        "cpu_flags": sorted(cpu.flags),
        "cpu_native_bf16": cpu.native_bf16,
        "cpu_avx512": cpu.avx512,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch_version,
        "torch_threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(path: str | Path, result: dict[str, Any], *, threads: int | None = None) -> Path:
    """Write a benchmark's JSON, :func:`machine` added under ``"machine"``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine(threads)}, indent=2) + "\n")
    return out
