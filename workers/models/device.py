"""Where models run: device resolution and mixed precision, shared by every model family."""

from __future__ import annotations

import contextlib

import torch

from groundlabel.errors import UserError
from workers.models import cpu as _cpu
from workers.models.cpu import CpuInfo, cpu_precision

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"invalid device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_precision(
    device: torch.device,
    precision: str = "auto",
    cpu_setting: str = "auto",
    *,
    cuda: str = "bf16",
    cpu: CpuInfo | None = None,
) -> str:
    """The arithmetic an engine runs in on ``device``, ``fp32`` or ``bf16``: ``precision`` when it names one
    (an engine's own option, any device); else ``cuda`` on a GPU, and on a CPU ``cpu_setting``
    (``GROUNDLABEL_CPU_PRECISION``: ``auto`` is bf16 where ``cpu``, default this machine's, has native
    bf16; :func:`workers.models.cpu.cpu_precision`)."""
    if precision in PRECISIONS:
        return precision
    if precision != "auto":
        raise UserError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if device.type != "cpu":
        return cuda
    return cpu_precision(cpu_setting, (cpu or _cpu.machine_cpu()).flags)


def version_precision(device: torch.device, precision: str) -> str:
    """The precision an engine's version names: ``bf16`` for bf16 on a CPU (its outputs differ from the
    fp32 ones; ``groundlabel.versions.with_precision``), else ``fp32`` (CUDA's names have always stood for
    its bf16 autocast)."""
    return "bf16" if device.type == "cpu" and precision == "bf16" else "fp32"


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA under ``auto``; ``bf16`` forces it (CPU too); ``fp32`` disables it.

    On a CPU the weights' bf16 copies are not cached for the block (``cache_enabled=False``): each product
    casts its weight when it runs, so the peak memory stays that of one weight's copy beside the fp32
    model rather than a second copy of every weight."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
