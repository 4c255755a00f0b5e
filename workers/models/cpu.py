"""The CPU the workers run on, as Linux describes it: model name and feature flags (no torch import).

Used to key per-machine choices (GEM's CPU kernels), to choose the engines' CPU arithmetic
(:func:`cpu_precision`: ``GROUNDLABEL_CPU_PRECISION``) and to describe the machine in benchmark results.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from groundlabel.settings import CPU_PRECISIONS

#: Flags that mean the CPU multiplies bf16 natively (AVX512-BF16 dot products, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def has_native_bf16(flags: Iterable[str]) -> bool:
    """Whether CPU feature ``flags`` (as ``/proc/cpuinfo`` names them) include bf16 arithmetic in
    hardware: :data:`BF16_FLAGS`."""
    return not set(BF16_FLAGS).isdisjoint(flags)


def cpu_precision(setting: str, flags: Iterable[str]) -> str:
    """The arithmetic the engines use on a CPU with feature ``flags``: ``fp32`` or ``bf16`` as ``setting``
    (``GROUNDLABEL_CPU_PRECISION``) names it, ``auto`` → bf16 where the CPU has it natively
    (:func:`has_native_bf16`), else fp32 (emulated bf16 would be slower than fp32)."""
    if setting not in CPU_PRECISIONS:
        raise ValueError(f"unknown CPU precision {setting!r}; expected one of {', '.join(CPU_PRECISIONS)}")
    if setting != "auto":
        return setting
    return "bf16" if has_native_bf16(flags) else "fp32"


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and its feature flags."""

    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX)."""
        return has_native_bf16(self.flags)

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


@functools.cache
def machine_cpu() -> CpuInfo:
    """This machine's CPU, read once per process (what ``auto`` precisions are resolved against)."""
    return cpu_info()
