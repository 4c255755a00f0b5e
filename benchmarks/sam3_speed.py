"""SAM 3 speed through the engine: images/s at batch 1 and 8, and the cost of each extra label.

Random weights of the real architecture (``transformers``' default ``Sam3Config``, which is
``facebook/sam3``'s: ViT 32 layers × 1024 at 1008×1008, CLIP text tower 24 × 1024, DETR 6 + 6 layers,
200 queries; about 840 M parameters); speed does not depend on the weights. Timed: the whole
``Sam3Engine.instances`` call (resizing, vision tower, text tower on a cache miss only, one detector and
mask-decoder pass per (image, label) pair, instances scored and upsampled), on 640×480 images, at the
default score floor of 0.5 (random weights find no instance above it; trained ones a few, whose
upsampling adds little).

"Extra label" is the time one more label adds per image: (t(L labels) − t(1 label)) / (L − 1) / batch.

``--parts`` times the two parts instead, which is steadier on a loaded CPU where a whole call's noise
exceeds a label's cost: the vision tower on the batch, and the detector + mask decoder on one
(image, prompt) pair (``--pair-repeats`` times, median), the latter being what each extra label costs per
image; images/s is then batch / (vision + batch × labels × pair).

    .venv/bin/python benchmarks/sam3_speed.py [--device auto] [--batches 1,8] [--labels 4] [--repeats N]
        [--precision auto|fp32|bf16]

``--precision auto`` is the engine's own: bf16 autocast on a GPU, and on a CPU as
``GROUNDLABEL_CPU_PRECISION=auto`` resolves there (bf16 where the CPU multiplies bf16 natively, AVX512-BF16
or AMX); run it once with ``fp32`` and once with ``bf16`` to compare the two on one machine.

GPU defaults: 5 timed repeats after a warm-up. CPU defaults: one timed call per row and a warm-up at
batch 1 only (a real-size forward takes tens of seconds there). Writes ``benchmarks/results/sam3_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mib, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ("car", "person", "dog", "traffic light", "bicycle", "bus", "tree", "building")


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    from workers.models.sam3 import Sam3Config, Sam3Engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--labels", type=int, default=4, help="labels of the multi-label rows (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (5 GPU, 1 CPU)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), else fp32",
    )
    parser.add_argument("--parts", action="store_true", help="time the vision tower and one pair apart")
    parser.add_argument("--pair-repeats", type=int, default=3, help="timed pairs with --parts (median)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sam3_speed.json"))
    args = parser.parse_args()
    if not 2 <= args.labels <= len(LABELS):
        parser.error(f"--labels must lie in 2..{len(LABELS)}")

    torch.manual_seed(0)
    start = time.perf_counter()
    engine = Sam3Engine(Sam3Config(model=None, device=args.device, precision=args.precision, batch_size=8))
    print(f"precision {engine.precision} (--precision {args.precision})", flush=True)
    build_s = time.perf_counter() - start
    device = engine.device
    gpu = device.type == "cuda"
    repeats = args.repeats or (5 if gpu else 1)
    params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    size = engine.model.config.vision_config.backbone_config.image_size
    print(f"SAM 3, random weights, {params:.0f} M parameters, input {size}x{size}, built in {build_s:.0f} s",
          flush=True)  # fmt: skip

    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    pool = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(max(batches))]

    def timed(images: list, prompts: list[str], warm: bool) -> float:
        if warm:
            engine.instances(images, prompts)
        if gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            engine.instances(images, prompts)
        if gpu:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats

    if args.parts:
        rows = [_parts_row(engine, pool[:b], args, repeats) for b in batches]
        return _report(args, rows, engine, repeats, params, size, "parts")

    rows = []
    for batch in batches:
        images = pool[:batch]
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        one = timed(images, list(LABELS[:1]), warm=gpu or batch == batches[0])
        many = timed(images, list(LABELS[: args.labels]), warm=gpu)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else peak_rss_mib()
        extra = (many - one) / (args.labels - 1) / batch
        row = {
            "batch": batch,
            "s_per_call_1_label": round(one, 3),
            f"s_per_call_{args.labels}_labels": round(many, 3),
            "images_per_s_1_label": round(batch / one, 4),
            f"images_per_s_{args.labels}_labels": round(batch / many, 4),
            "extra_label_ms_per_image": round(1000 * extra, 1),
            "peak_MiB": round(peak),
            "peak_kind": "cuda allocated" if gpu else "process RSS, peak so far",
        }
        rows.append(row)
        print(
            f"batch {batch}: {one:.1f} s per call with 1 label, {many:.1f} s with {args.labels}: "
            f"{row['images_per_s_1_label']} images/s with 1 label, "
            f"{row[f'images_per_s_{args.labels}_labels']} with {args.labels}; "
            f"+{row['extra_label_ms_per_image']} ms per image per extra label; peak {row['peak_MiB']} MiB",
            flush=True,
        )

    return _report(args, rows, engine, repeats, params, size, "whole calls")


def _parts_row(engine, images: list, args, repeats: int) -> dict:
    """Vision tower on the batch and one detector pass on one (image, prompt) pair, timed apart."""
    import statistics

    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    from workers.models.device import autocast_context

    device, gpu = engine.device, engine.device.type == "cuda"

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    text, mask = engine.text_features(["car"])
    with torch.inference_mode(), autocast_context(device, engine.precision):
        pixels = engine.preprocess(images).to(device)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
            engine.model.get_vision_features(pixel_values=pixels)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            vision = engine.model.get_vision_features(pixel_values=pixels)
        sync()
        vision_s = (time.perf_counter() - t0) / repeats
        one = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(t[:1] for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(t[:1] for t in vision.fpn_position_encoding),
        )
        times = []
        for _ in range(args.pair_repeats + (1 if gpu else 0)):
            sync()
            t0 = time.perf_counter()
            embeds = BaseModelOutputWithPooling(pooler_output=text)
            engine.model(vision_embeds=one, text_embeds=embeds, attention_mask=mask)
            sync()
            times.append(time.perf_counter() - t0)
        pair_s = statistics.median(times[1:] if gpu else times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else peak_rss_mib()
    batch, n = len(images), args.labels
    row = {
        "batch": batch,
        "vision_s_per_batch": round(vision_s, 3),
        "pair_s": round(pair_s, 4),
        "images_per_s_1_label": round(batch / (vision_s + batch * pair_s), 4),
        f"images_per_s_{n}_labels": round(batch / (vision_s + batch * n * pair_s), 4),
        "extra_label_ms_per_image": round(1000 * pair_s, 1),
        "peak_MiB": round(peak),
        "peak_kind": "cuda allocated" if gpu else "process RSS, peak so far",
    }
    print(f"batch {batch}: vision {vision_s:.1f} s per batch, one (image, prompt) pair {pair_s:.2f} s "
          f"(median of {len(times)}); peak {row['peak_MiB']} MiB", flush=True)  # fmt: skip
    return row


def _report(args, rows: list[dict], engine, repeats: int, params: float, size: int, mode: str) -> int:
    import torch

    device = engine.device
    gpu = device.type == "cuda"
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({cpu})"
    precision = "bf16 autocast" if engine.precision == "bf16" else "fp32"
    print(f"\nSAM 3 engine, 640x480 images, {name}, {precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {repeats} timed call(s) per row")  # fmt: skip
    n = args.labels
    print(f"| batch | images/s, 1 label | images/s, {n} labels | extra label (ms / image) | peak (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['images_per_s_1_label']} | {r[f'images_per_s_{n}_labels']} | "
            f"{r['extra_label_ms_per_image']} | {r['peak_MiB']} ({r['peak_kind']}) |"
        )
    out = write_result(
        args.out,
        {
            "device": name,
            "precision": precision,
            "params_M": round(params, 1),
            "input_size": size,
            "image_size": [640, 480],
            "mode": mode,
            "repeats": repeats,
            "rows": rows,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
