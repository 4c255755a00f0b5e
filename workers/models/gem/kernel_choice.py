"""Which CPU path GEM's tower takes on this machine: timed at the first load, then kept per machine.

The tower's CPU forward can take three paths (:data:`kernels.PATHS`) that compute the same numbers:
``packed`` (oneDNN kernels, linear weights packed once and kept), ``onednn`` (oneDNN kernels, weights
reordered on every call) and ``torch`` (plain PyTorch). Which is fastest depends on the CPU, on how
oneDNN and MKL serve it and on the input size: oneDNN's kernels were twice MKL's speed on one AMD EPYC with
AVX-512, slower than plain PyTorch on an Intel Xeon, and on an AVX2-only machine within 10 % of it (behind
on two threads) but slowed far more when other jobs took a core. So :func:`choose`, on a tower's first CPU
load on a machine, times a small input of the engine's token count on every path the build allows: one
unchanged block and one GEM block's self-self attention (what a forward repeats, at about a sixth of its
cost), the paths alternating, and keeps the fastest by the median over rounds of each path's time relative
to plain PyTorch's in the same round. Plain PyTorch is kept unless another path beats it by more than
:data:`TOLERANCE`, so the choice is never slower than plain PyTorch by more than the timing noise. The
timing stops after :data:`ROUNDS` rounds when every round agrees (:func:`settled`) and goes on up to
:data:`MAX_ROUNDS` when they do not: on a 2-core AVX2 EPYC three rounds disturbed by a passing load once
picked oneDNN's kernels, which ran whole forwards 25 % slower than plain PyTorch there.

With bf16 products (``precision="bf16"``, the engine's ``GROUNDLABEL_CPU_PRECISION`` on a CPU with native
bf16) the same paths are timed in bf16, plain PyTorch under CPU autocast against the oneDNN kernels on bf16
operands (:mod:`.kernels`), and the choice is kept under a key of its own.

The choice is written to :data:`CACHE_FILE` in the cache folder (``GemConfig.kernel_cache``; the workers'
``$XDG_CACHE_HOME/groundlabel``), keyed by :func:`machine_key`: the CPU (model name and a hash of its flags),
the torch version, the thread count, the paths allowed, the tower's shape and the token count. Later loads
with the same key read it and time nothing; processes loading at once take turns (a lock beside the file),
so only the first times. ``GemConfig.cpu_kernels`` (``GROUNDLABEL_GEM_CPU_KERNELS``) forces a path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from workers.models.cpu import CpuInfo, cpu_info

from . import kernels
from .modules import GemVisionTower

__all__ = [
    "CACHE_FILE",
    "MAX_ROUNDS",
    "ROUNDS",
    "TOLERANCE",
    "Choice",
    "choose",
    "fastest",
    "machine_key",
    "medians",
    "settled",
    "time_paths",
]

log = logging.getLogger(__name__)

CACHE_FILE = "gem-cpu-kernels.json"
#: How much faster than plain PyTorch another path must be to be chosen (a fraction of torch's time).
TOLERANCE = 0.03
#: Timed rounds after one warm-up run per path, when they all agree (:func:`settled`) ...
ROUNDS = 3
#: ... and at most, while they do not.
MAX_ROUNDS = 9
_memo: dict[tuple[str, str], Choice] = {}  # (cache file or "", key) -> choice, per process
_memo_lock = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """The CPU path a tower takes, and why: ``forced`` (the setting), ``cached`` (timed on this machine
    before), ``timed`` (timed now) or ``only`` (a single path available)."""

    path: str
    source: str
    timings: dict[str, float] = field(default_factory=dict)  # median seconds of the probe, by path


Times = Mapping[str, float | Sequence[float]]  # seconds by path: one number, or one per round


def _rounds(times: Times) -> dict[str, list[float]]:
    return {p: [float(t)] if isinstance(t, int | float) else [float(x) for x in t] for p, t in times.items()}


def medians(times: Times) -> dict[str, float]:
    """The median seconds of each path."""
    return {path: statistics.median(values) for path, values in _rounds(times).items()}


def fastest(times: Times, tolerance: float = TOLERANCE) -> str:
    """The fastest path from its seconds (per round, the rounds aligned across paths): with ``torch``
    timed, by the median over rounds of each path's time over torch's in the same round (a load that
    comes and goes hits both alike), and ``torch`` unless another path is faster than it by more than
    ``tolerance`` (a fraction); without it, by median time."""
    rounds = _rounds(times)
    if not rounds:
        raise ValueError("no timings to choose from")
    if "torch" in rounds:
        score = {path: statistics.median(rs) for path, rs in _ratios(rounds).items()}
        score["torch"] = 1.0
    else:
        score = medians(rounds)
    best = min(score, key=lambda path: (score[path], kernels.PATHS.index(path)))
    if "torch" in score and best != "torch" and score[best] > 1.0 - tolerance:
        return "torch"
    return best


def _ratios(rounds: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Each path's time over plain PyTorch's, round by round (the rounds aligned)."""

    def ratio(t: float, b: float) -> float:
        if b > 0:
            return t / b
        return 1.0 if t <= 0 else float("inf")  # a clock too coarse to tell

    base = rounds["torch"]
    return {
        p: [ratio(t, b) for t, b in zip(ts, base, strict=True)] for p, ts in rounds.items() if p != "torch"
    }


def settled(times: Times, tolerance: float = TOLERANCE) -> bool:
    """Whether the rounds so far agree on :func:`fastest`'s choice, so that more rounds would not change it:
    plain PyTorch beaten by the chosen path by more than ``tolerance`` in every round, or, when plain
    PyTorch is chosen, no other path beating it by that much in any round. Without plain PyTorch's times,
    always."""
    rounds = _rounds(times)
    if "torch" not in rounds:
        return True
    ratios = _ratios(rounds)
    best = fastest(rounds, tolerance)
    if best == "torch":
        return all(r >= 1.0 - tolerance for rs in ratios.values() for r in rs)
    return all(r < 1.0 - tolerance for r in ratios[best])


def machine_key(
    tower: GemVisionTower,
    paths: Sequence[str],
    tokens: int,
    *,
    cpu: CpuInfo | None = None,
    torch_version: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
) -> str:
    """The key a choice is kept under: CPU model and flags, torch version, threads, paths, tower shape,
    token count and (when not fp32) the precision of the products."""
    cpu = cpu or cpu_info()
    transformer = tower.visual.transformer
    heads = tower._attentions[0].num_heads
    shape = (
        f"width {transformer.width} blocks {len(transformer.resblocks)} heads {heads} "
        f"depth {tower.gem_depth} iter {tower.ss_attn_iter} tokens {tokens}"
    )
    parts = [
        cpu.fingerprint(),
        f"torch {torch_version or torch.__version__}",
        f"threads {threads or torch.get_num_threads()}",
        ",".join(paths),
        shape,
    ]
    if precision != "fp32":
        parts.append(precision)
    return " | ".join(parts)


def time_paths(
    run: Callable[[], object],
    paths: Sequence[str],
    *,
    rounds: int = ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
    precision: str = "fp32",
) -> dict[str, list[float]]:
    """Seconds of ``run()`` under each of ``paths`` (:func:`kernels.using`, products in ``precision``), one
    per round: one warm-up call per path (packing, compiling), then ``rounds`` rounds in which every path
    runs once, the order rotating, and more rounds, up to ``max_rounds``, until they are :func:`settled`."""
    for path in paths:
        with kernels.using(path, precision):
            run()
    times: dict[str, list[float]] = {path: [] for path in paths}
    for r in range(max(rounds, max_rounds)):
        if r >= rounds and settled(times):
            break
        order = list(paths[r % len(paths) :]) + list(paths[: r % len(paths)])
        for path in order:
            with kernels.using(path, precision):
                start = clock()
                run()
                times[path].append(clock() - start)
    return times


def _tokens(tower: GemVisionTower, size: tuple[int, int]) -> int:
    gh, gw = tower.grid_for(*size)
    return 1 + gh * gw


def _probe(tower: GemVisionTower, tokens: int) -> Callable[[], object]:
    """The work a GEM forward repeats, on seeded tokens of one image: the first unchanged block, then the
    last block's q/k/v and GEM's self-self attention on them (the path comes from :func:`kernels.using`)."""
    blocks = tower.visual.transformer.resblocks
    width = tower.visual.transformer.width
    x = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(0))
    first, last = (blocks[0], tower._attentions[0]), (blocks[-1], tower._attentions[-1])

    def run() -> object:
        with torch.inference_mode():
            y = tower._block(*first, x)
            h = last[0].ln_1(y)
            q, k, v = last[1].qkv(h)
            return tower._gem_attention(q, k, v, h, last[1].head_dim)

    return run


def choose(
    tower: GemVisionTower,
    setting: str = "auto",
    cache_dir: str | Path | None = None,
    *,
    size: tuple[int, int] | None = None,
    measure: Callable[[Sequence[str]], Times] | None = None,
    key: str | None = None,
    precision: str = "fp32",
) -> Choice:
    """The CPU path for ``tower`` on inputs of ``size`` (height, width; default the tower's native size)
    with its products in ``precision`` (:data:`kernels.PRECISIONS`): ``setting`` when it names one, else
    the machine's kept choice, else the fastest by timing (``measure(paths)`` → seconds by path, per round;
    default :func:`time_paths` on a probe of the tower), written to ``cache_dir`` (when None, kept for this
    process only)."""
    if setting != "auto":
        if setting not in kernels.PATHS:
            raise ValueError(f"unknown CPU kernel path {setting!r}; expected auto or one of {kernels.PATHS}")
        return Choice(setting, "forced")
    paths = kernels.available_paths(precision)
    if len(paths) == 1:
        return Choice(paths[0], "only")
    if size is None:
        native = tower.visual.image_size
        size = (native, native) if isinstance(native, int) else (int(native[0]), int(native[1]))
    tokens = _tokens(tower, size)
    key = key or machine_key(tower, paths, tokens, precision=precision)
    file = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None
    memo_key = (str(file or ""), key)
    with _memo_lock:
        if memo_key in _memo:
            return _memo[memo_key]
        with _machine_lock(file):
            kept = _read(file).get(key) if file is not None else None
            if isinstance(kept, dict) and kept.get("path") in paths:
                choice = Choice(kept["path"], "cached", dict(kept.get("timings_s") or {}))
            else:
                timing = measure or (lambda ps: time_paths(_probe(tower, tokens), ps, precision=precision))
                rounds = _rounds(timing(paths))
                choice = Choice(fastest(rounds), "timed", medians(rounds))
                log.info(
                    "GEM CPU kernels: %s (median %s; %s)",
                    choice.path,
                    ", ".join(f"{p} {t * 1000:.0f} ms" for p, t in choice.timings.items()),
                    key,
                )
                if file is not None:
                    _store(file, key, choice, rounds)
            if choice.path != "packed":
                kernels.release_packed_weights()  # the timing's packed copies, unused from now on
        _memo[memo_key] = choice
        return choice


@contextlib.contextmanager
def _machine_lock(file: Path | None) -> Iterator[None]:
    """Holds an exclusive lock beside ``file`` (``flock``) while the choice is read, timed and written, so
    that processes loading at once on a machine time one after the other (the later ones read the first's
    choice) instead of timing each other's load. Without a file, or where locking fails, no lock."""
    if file is None:
        yield
        return
    try:
        import fcntl

        file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(file.with_name(file.name + ".lock"), "a")  # noqa: SIM115 (held across the yield)
    except (ImportError, OSError):
        yield
        return
    with handle:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read(file: Path | None) -> dict:
    """The kept choices by key (empty when the file is missing or unreadable)."""
    if file is None:
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    return choices if isinstance(choices, dict) else {}


def _store(file: Path, key: str, choice: Choice, rounds: Mapping[str, Sequence[float]]) -> None:
    """Adds ``choice`` (and the times of each round) under ``key`` to the file (written whole to a
    temporary file, then renamed)."""
    choices = _read(file)
    choices[key] = {
        "path": choice.path,
        "timings_s": {p: round(t, 6) for p, t in choice.timings.items()},
        "rounds_s": {p: [round(t, 6) for t in ts] for p, ts in rounds.items()},
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"version": 1, "choices": choices}, out, indent=2, sort_keys=True)
        os.replace(tmp, file)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("GEM CPU kernels: cannot keep the choice in %s (%s); timing again next time", file, exc)
