"""GEM dense-feature speed: this project's GemVisionTower against the official gem-torch, in one run.

The baseline is the real thing: ``gem-torch`` 1.0.1 (its ``GEMWrapper``) on ``open_clip_torch`` 2.23.0, the
version it needs. It is installed on demand from ``requirements/gemtorch.txt`` (``pip install
--require-hashes --no-deps --target``) into groundlabel's cache folder (``$XDG_CACHE_HOME/groundlabel``,
default ``~/.cache/groundlabel``, as ``gem-torch-<hash of the lock>``), and runs in its own subprocess with
that folder first on ``sys.path``: torch, torchvision, timm and the rest come from this environment. It runs
on the very weights of the project's tower, a random-weight CLIP (seed 0) saved as safetensors and loaded
strictly into open_clip 2.23's model: the state-dict keys of open_clip's ViT CLIPs are the same in 2.23 and
3.x, so no key is renamed, and a layout that differed would fail the load instead of timing other weights.
Its GEM and CLIP tokens are compared with the tower's. Only ``gem.gem_wrapper`` and ``gem.gem_utils`` are
imported (``gem/__init__`` pulls in plotting packages the forward does not use). ``--gem-torch DIR`` uses
a folder made by hand; ``--no-gem-torch`` leaves it out (a machine that cannot install it).

Implementations (``--impls``):

- ``project``: the tower as the engine runs it on this machine: on the CPU, the kernel path chosen per
  machine (``workers/models/gem/kernel_choice.py``, kept in the cache folder; ``--kernels`` forces one),
  timed on ``dense_features(pixels, "gem")``, the engine's call (``--path both`` times
  ``GemVisionTower.forward``, which computes the CLIP tokens too, as gem-torch does);
- ``project/packed``, ``project/onednn``, ``project/torch``: the tower on one CPU path (fp32);
- ``project/bf16``: the tower as the engine runs it on a CPU in bf16 (``GROUNDLABEL_CPU_PRECISION``): the
  path chosen per machine for bf16 products (the oneDNN kernels with bf16 operands, or plain PyTorch under
  bf16 autocast; fast only on a CPU with native bf16: AVX512-BF16 or AMX);
- ``gem-torch``: the official ``GEMWrapper``'s forward (GEM and CLIP tokens);
- ``baseline``: the tower of another checkout of this project (``--baseline DIR``, e.g. an earlier
  commit unpacked with ``git archive``), for before/after figures in one run.

Every (implementation, size) is measured in its own subprocess per round, the order of the implementations
rotating from round to round (``--rounds N``), so that they share the machine's load alike. Each row has
the median over the rounds of each round's median wall time and CPU time (``time.process_time``, all
threads) per image, the best wall time, and the speed-ups as the median of the per-round ratios (each
ratio from one round, whose runs followed one another). The JSON records the machine (CPU model and
flags, torch version, threads) and the load average before, during (per run) and after.

    python benchmarks/gem_speed.py --sizes 448 896 --batch 1 --repeats 2 --rounds 3 \\
        --impls project gem-torch project/packed project/torch
    python benchmarks/gem_speed.py --device cuda --sizes 448 672 896 --batch 8
    python benchmarks/gem_speed.py --sizes 448 896 --batch 1 --repeats 3 --rounds 3 \\
        --impls project project/bf16 gem-torch        # bf16 against fp32 and gem-torch on a CPU

``--precision fp32|bf16|auto`` (default fp32) is the arithmetic of ``project`` on a CPU: ``auto`` as the
engine resolves ``GROUNDLABEL_CPU_PRECISION=auto`` on this machine (bf16 where the CPU has it natively).

Prints a table and writes JSON (default ``benchmarks/results/gem_speed.json``). Peak memory: on CUDA the
growth of ``torch.cuda.max_memory_allocated`` over the loaded model; on CPU the growth of the process's peak
RSS (VmHWM, reset before the forwards) over the loaded model, each (implementation, size) in its own
subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_rss_mib, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT = "project"
PATHS = ("packed", "onednn", "torch")
OFFICIAL = "gem-torch"
BASELINE = "baseline"
BF16 = f"{PROJECT}/bf16"
IMPLS = (PROJECT, *(f"{PROJECT}/{p}" for p in PATHS), BF16, OFFICIAL, BASELINE)
LOCK = ROOT / "requirements" / "gemtorch.txt"


# ----------------------------------------------------------------------------- the official gem-torch
def _has_gem_torch(folder: Path) -> bool:
    return (folder / "gem" / "gem_wrapper.py").is_file() and (folder / "open_clip").is_dir()


def gem_torch_folder() -> Path:
    """The folder holding gem-torch and open_clip 2.23 from ``requirements/gemtorch.txt``, installed with
    pip on first use into the cache folder (one folder per lock content)."""
    from groundlabel.settings import cache_folder

    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    folder = cache_folder() / f"gem-torch-{digest}"
    if _has_gem_torch(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    print(f"installing gem-torch ({LOCK.relative_to(ROOT)}) into {folder}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps"]
    try:
        subprocess.run([*cmd, "--target", str(tmp), "-r", str(LOCK)], check=True)
        tmp.rename(folder)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _has_gem_torch(folder):  # another run installed it meanwhile
            return folder
        raise SystemExit(
            f"gem-torch could not be installed ({exc}); give --gem-torch DIR or --no-gem-torch"
        ) from exc
    return folder


def official_runner(folder: str, model_name: str, weights: str, device: str):
    """The official gem-torch's forward (``GEMWrapper`` on open_clip 2.23 from ``folder``) on ``weights``."""
    import types

    sys.path.insert(0, str(Path(folder).resolve()))
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        del sys.modules[name]
    import open_clip
    import torch
    from safetensors.torch import load_file

    package = types.ModuleType("gem")  # gem/__init__ imports matplotlib for its plotting helpers only
    package.__path__ = [str(Path(folder).resolve() / "gem")]
    sys.modules["gem"] = package
    from gem.gem_wrapper import GEMWrapper

    if not str(Path(open_clip.__file__).resolve()).startswith(str(Path(folder).resolve())):
        raise RuntimeError(f"open_clip was not imported from {folder}: {open_clip.__file__}")
    model = open_clip.create_model(model_name, pretrained=None).eval()
    model.load_state_dict(load_file(weights))  # strict: the same keys as the project's model
    model = model.to(device)
    GEMWrapper(model, None, depth=7)  # swaps the last 6 blocks and the tower's forward in place
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def run(pixels):
        with torch.inference_mode(), amp:
            return model.visual(pixels)  # [GEM tokens, CLIP tokens]

    return run, int(model.visual.patch_size[0])


# ----------------------------------------------------------------------------- the project's tower
def build(model_name: str, device: str, threads: int | None, tree: str | None = None):
    """The random-weight CLIP (seed 0) and a ``GemVisionTower`` on it, from this checkout or ``tree``."""
    if tree:
        sys.path.insert(0, str(Path(tree).resolve()))
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval().to(device)
    from workers.models.gem import GemVisionTower

    if tree and not str(Path(sys.modules["workers"].__path__[0]).resolve()).startswith(
        str(Path(tree).resolve())
    ):
        raise RuntimeError(f"workers was not imported from {tree}")

    return model, GemVisionTower(model.visual, gem_depth=7)


def impl_precision(impl: str, args) -> str:
    """The arithmetic of ``impl``: ``bf16-autocast`` on CUDA; on a CPU ``bf16`` for ``project/bf16`` and for
    ``project`` under ``--precision bf16`` (or ``auto`` on a CPU with native bf16), else ``fp32``."""
    if args.device == "cuda":
        return "bf16-autocast"
    if impl == BF16:
        return "bf16"
    if impl == PROJECT and args.precision != "fp32":
        import torch

        from workers.models.device import resolve_precision

        return resolve_precision(torch.device("cpu"), "auto", args.precision)
    return "fp32"


def set_kernels(tower, impl: str, size: int, args) -> dict:
    """Put the tower on its CPU path and precision: the path ``impl`` names (fp32), else the machine's
    choice for the row's precision as the engine makes it (``--kernels`` forces one). Returns what the row
    records of it."""
    if args.device != "cpu" or not hasattr(tower, "cpu_kernels"):
        return {}
    precision = impl_precision(impl, args)
    if hasattr(tower, "cpu_precision"):
        tower.cpu_precision = precision
    if "/" in impl and impl != BF16:
        tower.cpu_kernels = impl.split("/", 1)[1]
        return {"cpu_kernels": tower.cpu_kernels, "kernel_source": "impl"}
    from groundlabel.settings import cache_folder
    from workers.models.gem.kernel_choice import choose

    choice = choose(tower, args.kernels, cache_folder(), size=(size, size), precision=precision)
    tower.cpu_kernels = choice.path
    return {"cpu_kernels": choice.path, "kernel_source": choice.source, "kernel_timings_s": choice.timings}


def runner(tower, device: str, path: str = "gem", precision: str = "fp32"):
    """The project's forward to time: ``gem``, the GEM tokens alone as the engine asks for them; ``both``,
    ``GemVisionTower.forward`` (GEM and CLIP tokens); in bf16 autocast on CUDA; on a CPU the tower applies
    its ``cpu_precision`` itself (set by :func:`set_kernels`; a tower without one, from an older checkout,
    takes the engine's autocast for ``bf16``)."""
    import torch

    from workers.models.device import autocast_context

    if device == "cuda":
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
    elif precision == "bf16" and not hasattr(tower, "cpu_precision"):
        amp = autocast_context(torch.device("cpu"), "bf16")
    else:
        amp = contextlib.nullcontext()

    def run(pixels):
        with torch.inference_mode(), amp:
            return tower.dense_features(pixels, "gem") if path == "gem" else tower(pixels)

    return run


# ----------------------------------------------------------------------------- measurement
def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Give freed heap memory back to the system (glibc), then start the process's peak RSS (VmHWM) again
    from its current RSS (Linux; else nothing): memory the loading and the CPU path's timing freed is not
    reused unseen by the forwards."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_mib() -> float:
    """The peak RSS since :func:`reset_peak_rss` (VmHWM), else the process's whole-life peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mib()


def measure(impl: str, size: int, args) -> dict:
    """Time one implementation at one size in this process."""
    import torch

    extra: dict = {}
    if impl == OFFICIAL:
        if args.threads:
            torch.set_num_threads(args.threads)
        run, patch = official_runner(args.gem_torch, args.model, args.weights, args.device)
    else:
        tree = args.baseline if impl == BASELINE else None
        _, tower = build(args.model, args.device, args.threads, tree)
        extra = set_kernels(tower, impl, size, args) if impl != BASELINE else {}
        extra["precision"] = impl_precision(impl, args)
        run = runner(tower, args.device, "both" if args.tokens_out else args.path, extra["precision"])
        patch = tower.patch_size[0]
    out = args.tokens_out
    if out:  # GEM and CLIP tokens of a seeded input, for the agreement check
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(2, 3, size, size, generator=gen).to(args.device)
        gem, clip = run(probe)
        save_file({"gem": gem.float().cpu().contiguous(), "clip": clip.float().cpu().contiguous()}, out)
        return {"impl": impl, "size": size, **extra}
    pixels = torch.randn(args.batch, 3, size, size, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()  # loading the weights and choosing the CPU path are not the forward's
        base = current_rss_mib()
    try:
        for _ in range(args.warmup):
            run(pixels)
        sync()
        times, cpu_times = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            run(pixels)
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    except torch.OutOfMemoryError:
        return {"impl": impl, "size": size, "batch": args.batch, "error": "out of memory"}
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_since_reset_mib() - base
    best = min(times)
    return {
        "impl": impl,
        "size": size,
        "batch": args.batch,
        "tokens": 1 + (size // patch) ** 2,
        "images_per_s": args.batch / best,
        "ms_per_image": 1000 * best / args.batch,
        "median_ms_per_image": 1000 * statistics.median(times) / args.batch,
        "median_cpu_ms_per_image": 1000 * statistics.median(cpu_times) / args.batch,
        "cpu_ms_per_image": 1000 * min(cpu_times) / args.batch,
        "peak_mem_mib": peak,
        "load_average": os.getloadavg()[0],
        **extra,
    }


def agreement(args) -> dict:
    """Largest relative differences between the project's GEM and CLIP tokens (``forward``, on its
    per-machine CPU path, and ``dense_features(…, "gem")``) and gem-torch's, batch 2 at the smallest size."""
    from safetensors.torch import load_file

    size = min(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        tokens, rows = {}, {}
        for impl in (PROJECT, OFFICIAL):
            out = str(Path(tmp) / f"{impl}.safetensors")
            rows[impl] = measure_in_subprocess(impl, size, args, tokens_out=out)
            if "error" in rows[impl]:
                return {"size": size, "error": f"{impl}: {rows[impl]['error']}"}
            tokens[impl] = load_file(out)
    mine, theirs = tokens[PROJECT], tokens[OFFICIAL]

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {
        "size": size,
        "cpu_kernels": rows[PROJECT].get("cpu_kernels"),
        "gem_rel_diff": rel(mine["gem"], theirs["gem"]),
        "original_rel_diff": rel(mine["clip"], theirs["clip"]),
    }


def measure_in_subprocess(impl: str, size: int, args, *, tokens_out: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--device", args.device, "--sizes", str(size)]
    cmd += ["--batch", str(args.batch), "--model", args.model, "--repeats", str(args.repeats)]
    cmd += ["--warmup", str(args.warmup), "--path", args.path, "--kernels", args.kernels]
    cmd += ["--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if impl == OFFICIAL:
        cmd += ["--gem-torch", str(args.gem_torch), "--weights", args.weights]
    if impl == BASELINE:
        cmd += ["--baseline", args.baseline]
    if tokens_out:
        cmd += ["--tokens-out", tokens_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "size": size, "batch": args.batch, "error": proc.stderr.strip()[-300:]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict:
    """One row from the rounds of one (implementation, size): medians of the per-round medians, the best
    wall time, the smallest peak memory, the CPU path each round took."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = dict(ok[0])
    row["ms_per_image"] = statistics.median(r["median_ms_per_image"] for r in ok)
    row["cpu_ms_per_image"] = statistics.median(r["median_cpu_ms_per_image"] for r in ok)
    row["best_ms_per_image"] = min(r["ms_per_image"] for r in ok)
    row["peak_mem_mib"] = min(r["peak_mem_mib"] for r in ok)
    row["images_per_s"] = 1000 / row["ms_per_image"]
    row["rounds"] = len(ok)
    row["per_round_ms"] = [round(r["median_ms_per_image"], 1) for r in ok]
    row["per_round_cpu_ms"] = [round(r["median_cpu_ms_per_image"], 1) for r in ok]
    row["per_round_load"] = [round(r["load_average"], 2) for r in ok]
    if "cpu_kernels" in row:
        row["cpu_kernels"] = sorted({r["cpu_kernels"] for r in ok})
    for key in ("median_ms_per_image", "median_cpu_ms_per_image", "load_average", "kernel_timings_s"):
        row.pop(key, None)
    return row


def round_ratios(runs: dict, impls: tuple[str, ...], sizes: list[int]) -> dict:
    """``(a, b, size) -> (wall, cpu)``: how many times faster ``a`` is than ``b``, the median over rounds of
    the ratio of the two implementations' medians within a round."""
    out = {}
    for size in sizes:
        for a in impls:
            for b in impls:
                if a == b:
                    continue
                walls, cpus = [], []
                for ra, rb in zip(runs[(a, size)], runs[(b, size)], strict=True):
                    if "error" in ra or "error" in rb:
                        continue
                    walls.append(rb["median_ms_per_image"] / ra["median_ms_per_image"])
                    cpus.append(rb["median_cpu_ms_per_image"] / ra["median_cpu_ms_per_image"])
                if walls:
                    out[(a, b, size)] = (statistics.median(walls), statistics.median(cpus))
    return out


def table(rows: list[dict], ratios: dict) -> str:
    head = (
        "| impl | CPU path | size | batch | tokens | ms/image (median) | CPU ms/image (median) | "
        "best ms/image | peak mem (MiB) | speed-up over gem-torch (wall / CPU) | "
        "project's speed-up (wall / CPU) |"
    )
    out = [head, "|" + "---|" * 11]

    def pair(key):
        value = ratios.get(key)
        return f"{value[0]:.2f}x / {value[1]:.2f}x" if value else ""

    for r in rows:
        if "error" in r:
            error = r["error"][:60]
            out.append(f"| {r['impl']} | | {r['size']} | {r['batch']} | | error: {error} |" + " |" * 5)
            continue
        path = ",".join(r.get("cpu_kernels", []))
        out.append(
            f"| {r['impl']} | {path} | {r['size']} | {r['batch']} | {r['tokens']} | "
            f"{r['ms_per_image']:.1f} | {r['cpu_ms_per_image']:.1f} | {r['best_ms_per_image']:.1f} | "
            f"{r['peak_mem_mib']:.0f} | "
            f"{pair((r['impl'], OFFICIAL, r['size']))} | {pair((PROJECT, r['impl'], r['size']))} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square input sizes (default: 448 672 on CPU, 448 672 896 on CUDA)",
    )
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default: 2 CPU, 8 CUDA)")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--path",
        choices=("gem", "both"),
        default="gem",
        help="what the project's tower computes: gem = GEM tokens alone, the engine's call (default); "
        "both = GEM and CLIP tokens (GemVisionTower.forward), as gem-torch computes",
    )
    parser.add_argument(
        "--kernels",
        choices=("auto", *PATHS),
        default="auto",
        help="the CPU path of 'project': auto = chosen per machine as the engine does (default)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="the CPU arithmetic of 'project': auto = bf16 where the CPU has it natively (default fp32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (every implementation)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep, rotating the order")
    parser.add_argument(
        "--gem-torch",
        "--official",
        dest="gem_torch",
        default=None,
        help="a folder with gem-torch and open_clip_torch 2.23 (default: installed on demand from "
        "requirements/gemtorch.txt into the cache folder)",
    )
    parser.add_argument("--no-gem-torch", action="store_true", help="leave the official gem-torch out")
    parser.add_argument("--baseline", default=None, help="another checkout of this project to time as well")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="which to run")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gem_speed.json"))
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.sizes = args.sizes or ([448, 672, 896] if cuda else [448, 672])
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (10 if cuda else 3)

    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args)))
        return 0

    import torch

    if cuda and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    default = (PROJECT, *([] if args.no_gem_torch else [OFFICIAL]), *([BASELINE] if args.baseline else []))
    impls = tuple(args.impls or default)
    if PROJECT not in impls:
        parser.error("--impls must include project (the speed-ups are the project's)")
    if OFFICIAL in impls and args.no_gem_torch:
        parser.error("--impls gem-torch contradicts --no-gem-torch")
    if BASELINE in impls and not args.baseline:
        parser.error("baseline needs --baseline DIR")
    if OFFICIAL in impls:
        if args.gem_torch is None:
            args.gem_torch = str(gem_torch_folder())
        elif not _has_gem_torch(Path(args.gem_torch)):
            parser.error(f"--gem-torch {args.gem_torch}: no gem/gem_wrapper.py and open_clip in that folder")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if OFFICIAL in impls:
            from safetensors.torch import save_file

            model, _ = build(args.model, "cpu", args.threads)
            args.weights = str(Path(tmp) / "weights.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
            del model
        runs: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(args.rounds):
            for size in args.sizes:
                shift = rnd % len(impls)
                order = impls[shift:] + impls[:shift]
                for impl in order:
                    in_process = cuda and impl.startswith(PROJECT)
                    row = measure(impl, size, args) if in_process else measure_in_subprocess(impl, size, args)
                    runs.setdefault((impl, size), []).append(row)
                    path = f" [{row['cpu_kernels']}]" if "cpu_kernels" in row else ""
                    print(
                        f"  round {rnd + 1} {impl:14s} {size}{path}: "
                        f"{row.get('median_ms_per_image', float('nan')):.0f} ms/image, "
                        f"{row.get('median_cpu_ms_per_image', float('nan')):.0f} CPU ms/image "
                        f"(load {os.getloadavg()[0]:.1f}) {row.get('error', '')[-200:]}",
                        file=sys.stderr,
                    )
                    if cuda:
                        gc.collect()
                        torch.cuda.empty_cache()
        agree = agreement(args) if OFFICIAL in impls else {}
    load_after = os.getloadavg()
    rows = [summarize(runs[(impl, size)]) for size in args.sizes for impl in impls]
    ratios = round_ratios(runs, impls, args.sizes)
    device_name = torch.cuda.get_device_name() if cuda else None
    threads = args.threads or torch.get_num_threads()
    from workers.models.cpu import cpu_info

    where = device_name or cpu_info().model
    print(
        f"GEM dense features, {args.model} random weights, {args.device} ({where}), "
        f"torch {torch.__version__}, threads {threads}, "
        f"{'bf16 autocast' if cuda else 'project ' + impl_precision(PROJECT, args)}, "
        f"project path {args.path}, "
        f"median of {args.repeats} after {args.warmup} warm-up per round, {args.rounds} round(s), "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(table(rows, ratios))
    if "gem_rel_diff" in agree:
        print(
            f"agreement with gem-torch at {agree['size']} ({agree['cpu_kernels']} path): GEM tokens "
            f"rel. diff {agree['gem_rel_diff']:.2e}, CLIP tokens rel. diff {agree['original_rel_diff']:.2e}"
        )
    elif agree:
        print(f"agreement with gem-torch: {agree['error']}")
    result = {
        "benchmark": "gem_speed",
        "model": args.model,
        "device": args.device,
        "device_name": device_name,
        "threads": threads,
        "precision": impl_precision(PROJECT, args),
        "project_path": args.path,
        "kernels": args.kernels,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "load_average": {"before": load_before, "after": load_after},
        "results": rows,
        "speedups": [
            {"impl": a, "versus": b, "size": size, "wall": wall, "cpu": cpu}
            for (a, b, size), (wall, cpu) in ratios.items()
        ],
        "agreement": agree,
    }
    print(f"wrote {write_result(args.json, result, threads=threads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
