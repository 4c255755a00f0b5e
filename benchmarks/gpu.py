"""The engines' model forwards on a GPU: images/s, latency p50/p99 and peak GPU memory, batch × precision.

One command on a CUDA machine measures every registered engine (GEM's dense ViT-B/16 forward at 448,
LAVT Swin-B at 480, SAM 3 at 1008, each promptable SAM family at its smallest published size with one
click per image; random weights: speed does not depend on them) at batch 1, 8 and 32 under bf16 autocast
and fp32, inputs already on the device, and writes one JSON:

    .venv/bin/python benchmarks/gpu.py                      # CUDA; skips cleanly (exit 0) without it
    .venv/bin/python benchmarks/gpu.py --device cpu --quick  # tiny models on the CPU (what the test runs)
    .venv/bin/python benchmarks/gpu.py --engines gem --batches 1,8 --precisions bf16 --repeats 50

Each row: ``images_per_s`` (batch / median latency), ``latency_ms_p50`` / ``latency_ms_p99`` of one
synchronised forward of the whole batch, and on CUDA ``peak_gpu_mib`` (``torch.cuda.max_memory_allocated``
during the row) and ``peak_over_model_mib`` (the same above the memory held before the row: the model and
the inputs). A row that runs out of memory is recorded with ``"error": "out of memory"`` and the rest go on.
An engine whose modules are not installed is recorded as skipped with the reason.

To add an engine, register a function that builds its :class:`Case` (see ``_gem`` and ``_lavt``)::

    @register("name", requires=("some_package",))
    def _name(device: torch.device, quick: bool) -> Case:
        model = ...  # quick: a tiny configuration that runs in seconds on a CPU
        return Case("what is measured", inputs=lambda batch: ..., forward=lambda inputs: model(inputs))

Default output: ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu.json"
PRECISIONS = ("bf16", "fp32")


@dataclass
class Case:
    """One engine, built on its device: ``inputs(batch)`` makes a batch of device-resident inputs and
    ``forward(inputs)`` runs the model on it (under the benchmark's ``inference_mode`` and autocast)."""

    description: str
    inputs: Callable[[int], Any]
    forward: Callable[[Any], Any]


@dataclass(frozen=True)
class EngineBenchmark:
    """A registered engine: ``build(device, quick)`` returns its :class:`Case`; ``requires`` names the
    modules it imports (a missing one skips the engine with that reason)."""

    name: str
    build: Callable[[Any, bool], Case]
    requires: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """The first required module that cannot be imported, or ``None``."""
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return module
        return None


ENGINES: dict[str, EngineBenchmark] = {}


def register(name: str, *, requires: tuple[str, ...] = ()) -> Callable:
    """Decorator adding an engine benchmark ``build(device, quick) -> Case`` to :data:`ENGINES`."""

    def add(build: Callable[[Any, bool], Case]) -> Callable[[Any, bool], Case]:
        if name in ENGINES:
            raise ValueError(f"engine benchmark {name!r} is registered twice")
        ENGINES[name] = EngineBenchmark(name, build, tuple(requires))
        return build

    return add


# ----------------------------------------------------------------------------- engines
@register("gem", requires=("open_clip", "workers.models.gem.modules"))
def _gem(device: Any, quick: bool) -> Case:
    """GEM's dense features (method ``gem``, depth 7) of a random CLIP ViT-B/16 at 448×448."""
    import open_clip
    import torch

    from workers.models.gem.modules import GemVisionTower

    torch.manual_seed(0)
    if quick:
        vision = open_clip.model.CLIPVisionCfg(layers=3, width=48, head_width=12, patch_size=8, image_size=32)
        text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
        model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
        name, size = "tiny CLIP ViT", 32
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        name, size = "CLIP ViT-B/16", 448
    tower = GemVisionTower(model.visual.to(device).eval(), gem_depth=7)
    return Case(
        f"GEM dense features, {name}, {size}x{size}",
        inputs=lambda batch: torch.randn(batch, 3, size, size, device=device),
        forward=lambda pixels: tower.dense_features(pixels, "gem"),
    )


@register("lavt", requires=("transformers", "workers.models.lavt.model"))
def _lavt(device: Any, quick: bool) -> Case:
    """LAVT's network (BERT + Swin with PWAM + decoder, logits at 1/4 resolution) at 480×480, 20 tokens."""
    import torch

    from workers.models.lavt.config import LavtConfig
    from workers.models.lavt.model import LavtNetwork

    torch.manual_seed(0)
    variant, size = ("tiny", 64) if quick else ("swin_b", 480)
    net = LavtNetwork(LavtConfig(variant=variant, device=str(device))).to(device).eval()
    vocab = net.bert_model.config.vocab_size
    sentence = torch.tensor([101, 1996, 2158, 1999, 1996, 2417, 3797, 102]) % vocab

    def inputs(batch: int) -> tuple[Any, Any, Any]:
        ids = torch.zeros((batch, 20), dtype=torch.long, device=device)
        ids[:, : len(sentence)] = sentence.to(device)
        return torch.randn(batch, 3, size, size, device=device), ids, (ids > 0).long()

    return Case(
        f"LAVT {variant} network, {size}x{size}, 20 tokens",
        inputs=inputs,
        forward=lambda x: net(*x, upsample=False),
    )


@register("sam3", requires=("transformers", "workers.models.sam3.engine"))
def _sam3(device: Any, quick: bool) -> Case:
    """SAM 3's whole forward (vision tower, text tower, detector, mask decoder) at 1008×1008, one noun
    phrase per image (``benchmarks/sam3_speed.py`` times the engine end to end, with more labels)."""
    import torch
    from transformers import Sam3Config, Sam3Model

    from workers.models.sam3.processor import MAX_TEXT_TOKENS, clip_tokenizer
    from workers.models.sam3.tiny import tiny_sam3_model

    torch.manual_seed(0)
    model = (tiny_sam3_model() if quick else Sam3Model(Sam3Config())).to(device).eval()
    size = model.config.vision_config.backbone_config.image_size
    text = clip_tokenizer()("car", padding="max_length", max_length=MAX_TEXT_TOKENS, return_tensors="pt")

    def inputs(batch: int) -> tuple[Any, Any, Any]:
        ids = text["input_ids"].repeat(batch, 1).to(device)
        mask = text["attention_mask"].repeat(batch, 1).to(device)
        return torch.randn(batch, 3, size, size, device=device), ids, mask

    return Case(
        f"SAM 3 {'tiny' if quick else 'facebook/sam3 architecture'}, {size}x{size}, one phrase per image",
        inputs=inputs,
        forward=lambda x: model(pixel_values=x[0], input_ids=x[1], attention_mask=x[2]),
    )


def _promptable_sam(name: str) -> Callable[[Any, bool], Case]:
    """A promptable SAM family's whole forward (image encoder, prompt encoder, mask decoder) for one
    click per image, at the family's smallest published architecture (``real_config``)."""

    def build(device: Any, quick: bool) -> Case:
        import torch

        from workers.models.sam import family, real_config, tiny_config

        fam = family(name)
        torch.manual_seed(0)
        model = fam.model_cls()(tiny_config(name) if quick else real_config(name)).to(device).eval()
        size = int(model.config.prompt_encoder_config.image_size)

        def inputs(batch: int) -> dict[str, Any]:
            return {
                "pixel_values": torch.randn(batch, 3, size, size, device=device),
                "input_points": torch.full((batch, 1, 1, 2), size / 2, device=device),
                "input_labels": torch.ones((batch, 1, 1), dtype=torch.long, device=device),
                "multimask_output": True,
            }

        label = f"tiny {fam.model_class}" if quick else fam.model_class
        return Case(f"{label}, {size}x{size}, one click per image", inputs, lambda x: model(**x))

    return build


for _family in ("sam", "sam_hq", "sam2", "edgetam", "sam3_tracker"):
    register(f"sam-{_family}", requires=("transformers", "workers.models.sam.families"))(
        _promptable_sam(_family)
    )


# ----------------------------------------------------------------------------- measurement
def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(case: Case, batch: int, precision: str, device: Any, args: argparse.Namespace) -> dict:
    """Time ``case`` at one batch size and precision: warm-up, then up to ``args.repeats`` synchronised
    forwards (at least ``args.min_repeats``; no new one starts after ``args.max_seconds``)."""
    import torch

    from workers.models.device import autocast_context

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    row: dict[str, Any] = {"batch": batch, "precision": precision}
    inputs = None
    try:
        inputs = case.inputs(batch)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times: list[float] = []
        with torch.inference_mode(), autocast_context(device, precision):
            for _ in range(args.warmup):
                case.forward(inputs)
            sync()
            started = time.perf_counter()
            while len(times) < args.repeats and (
                len(times) < args.min_repeats or time.perf_counter() - started < args.max_seconds
            ):
                t0 = time.perf_counter()
                case.forward(inputs)
                sync()
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    finally:
        del inputs
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    median = statistics.median(times)
    row.update(
        images_per_s=round(batch / median, 3),
        latency_ms_p50=round(1000 * median, 3),
        latency_ms_p99=round(1000 * percentile(times, 99), 3),
        latency_ms_mean=round(1000 * statistics.fmean(times), 3),
        repeats=len(times),
        peak_gpu_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        peak_over_model_mib=(
            round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1) if cuda else None
        ),
    )
    return row


def run_engine(bench: EngineBenchmark, device: Any, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Build one engine and measure every (precision, batch); returns (engine entry, rows)."""
    import torch

    missing = bench.missing()
    if missing is not None:
        reason = f"module {missing!r} is not installed"
        print(f"{bench.name}: skipped ({reason})", flush=True)
        return {"skipped": True, "reason": reason}, []
    try:
        case = bench.build(device, args.quick)
    except ImportError as exc:
        reason = f"cannot import what it needs: {exc}"
        print(f"{bench.name}: skipped ({reason})", flush=True)
        return {"skipped": True, "reason": reason}, []
    entry: dict[str, Any] = {"skipped": False, "description": case.description}
    if device.type == "cuda":
        entry["model_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            row = {"engine": bench.name, **measure(case, batch, precision, device, args)}
            rows.append(row)
            print(format_row(row), flush=True)
    del case
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry, rows


def format_row(row: dict) -> str:
    """One line of the progress output."""
    head = f"{row['engine']:6} {row['precision']:4} batch {row['batch']:3}:"
    if "error" in row:
        return f"{head} {row['error']}"
    peak = f"  peak {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") is not None else ""
    return (
        f"{head} {row['images_per_s']:9.2f} img/s  p50 {row['latency_ms_p50']:9.2f} ms  "
        f"p99 {row['latency_ms_p99']:9.2f} ms{peak}"
    )


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    out = [
        "| engine | precision | batch | images/s | latency p50 (ms) | latency p99 (ms) | peak GPU MiB | "
        "above model MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['error']} | | | | |")
            continue
        peak = "" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        above = "" if r["peak_over_model_mib"] is None else f"{r['peak_over_model_mib']:.0f}"
        out.append(
            f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.2f} | "
            f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {peak} | {above} |"
        )
    return "\n".join(out)


def write(path: Path, result: dict) -> None:
    from benchmarks.common import write_result

    print(f"wrote {write_result(path, result)}")


def csv_of(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models, batches 1,2, 2 repeats")
    parser.add_argument("--engines", type=csv_of(str), default=None, help=f"default: {','.join(ENGINES)}")
    parser.add_argument("--batches", type=csv_of(int), default=None, help="default 1,8,32 (quick: 1,2)")
    parser.add_argument("--precisions", type=csv_of(str), default=list(PRECISIONS))
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards a row (default 30, quick 2)"
    )
    parser.add_argument("--min-repeats", type=int, default=5, help="timed forwards at least")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="no new forward after this per row")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed forwards a row (default 3, quick 1)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.engines = args.engines or list(ENGINES)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; registered: {', '.join(ENGINES)}")
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        parser.error(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8, 32])
    if any(b < 1 for b in args.batches):
        parser.error("batch sizes must be >= 1")
    args.repeats = args.repeats or (2 if args.quick else 30)
    args.min_repeats = min(args.min_repeats, args.repeats)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    result: dict[str, Any] = {
        "benchmark": "gpu",
        "device": args.device,
        "torch": torch.__version__,
        "quick": args.quick,
        "batches": args.batches,
        "precisions": args.precisions,
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA is not available on this machine"
        print(f"{reason}: GPU benchmark skipped (--device cpu runs it on the CPU)")
        write(args.out, {**result, "skipped": True, "reason": reason, "engines": {}, "rows": []})
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        result.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows measure fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
    else:
        result.update(device_name=f"CPU ({platform.processor() or platform.machine()})")
        result["threads"] = torch.get_num_threads()
    engines: dict[str, dict] = {}
    rows: list[dict] = []
    for name in args.engines:
        engines[name], engine_rows = run_engine(ENGINES[name], device, args)
        rows.extend(engine_rows)
    result.update(skipped=False, engines=engines, rows=rows)
    print(f"\n{result['device_name']}, torch {torch.__version__}, inputs on the device, random weights")
    for name, entry in engines.items():
        print(f"- {name}: {entry.get('description') or 'skipped: ' + entry['reason']}")
    print(table(rows))
    write(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
