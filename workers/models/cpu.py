"""The CPU the workers run on, as Linux describes it: model name and feature flags (no torch import).

Used to key per-machine choices (GEM's CPU kernels) and to describe the machine in benchmark results.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

#: Flags that mean the CPU multiplies bf16 natively (AVX512-BF16 dot products, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and its feature flags."""

    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX)."""
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def avx512(self) -> bool:
        """Whether AVX-512 (foundation) is exposed."""
        return "avx512f" in self.flags

    def fingerprint(self) -> str:
        """The model name and a short hash of the flags: two machines sold under one name (or one CPU
        behind hypervisors exposing different features) get different fingerprints."""
        digest = hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:12]
        return f"{self.model} [{digest}]"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's ``model name`` and ``flags`` from the text of ``/proc/cpuinfo``."""
    model, flags = "", ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.strip()
        if model and flags:
            break
    return CpuInfo(model=model or platform.processor() or platform.machine(), flags=frozenset(flags.split()))


def cpu_info(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU (model name from ``platform`` and no flags where ``/proc/cpuinfo`` is missing)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text)
