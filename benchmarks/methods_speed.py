"""Speed of each dense-feature method of the GEM engine, and of PAMR refinement.

All methods run on the same random-weight open_clip model (ViT-B-16 by default) through
``GemVisionTower.dense_features``; PAMR runs on random score maps of an image at ``--pamr-scale`` of its
size (TCL's settings: dilations 1, 2, 4, 8, 12, 24, ten iterations). On CUDA the model runs under bf16
autocast.

    python benchmarks/methods_speed.py --device cpu --size 448 --batch 1
    python benchmarks/methods_speed.py --device cuda --size 448 --batch 8

Prints a table and writes JSON (default ``benchmarks/results/methods_speed.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("original", "maskclip", "gem", "clip_surgery", "sclip", "clearclip", "naclip", "clipself")


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pamr-image", default="1024x768", help="WxH of the image PAMR refines")
    parser.add_argument("--pamr-scale", type=float, default=0.25)
    parser.add_argument("--prompts", type=int, default=5, help="score maps refined by PAMR")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods_speed.json"))
    args = parser.parse_args()

    import open_clip
    import torch

    from workers.models.gem import GemVisionTower
    from workers.models.pamr import refine_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval().to(device)
    tower = GemVisionTower(model.visual, gem_depth=7)
    pixels = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    for method in METHODS:

        def run(method=method):
            with torch.no_grad(), amp:
                tower.dense_features(pixels, method)

        sec = timed(run, args.repeats, sync)
        rows.append({"what": method, "ms": 1000 * sec, "ms_per_image": 1000 * sec / args.batch})
    w, h = (int(v) for v in args.pamr_image.lower().split("x"))
    grid = args.size // 16
    scores = torch.rand(args.prompts, grid, grid, device=device)
    rgb = torch.rand(3, h, w, device=device)
    sec = timed(lambda: refine_scores(rgb, scores, scale=args.pamr_scale), args.repeats, sync)
    pw, ph = round(w * args.pamr_scale), round(h * args.pamr_scale)
    rows.append(
        {"what": f"pamr {args.prompts} maps @ {pw}x{ph}", "ms": 1000 * sec, "ms_per_image": 1000 * sec}
    )

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"{args.model} random weights, {args.size}px, batch {args.batch}, {device.type} ({dev_name}), "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'what':<26} | {'ms/batch':>9} | {'ms/image':>9}")
    print(f"{'-' * 26}-+-{'-' * 9}-+-{'-' * 9}")
    for r in rows:
        print(f"{r['what']:<26} | {r['ms']:9.1f} | {r['ms_per_image']:9.1f}")
    meta = {"model": args.model, "size": args.size, "batch": args.batch, "device": dev_name}
    print(f"wrote {write_result(args.out, {**meta, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
