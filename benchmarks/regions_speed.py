"""Region conversion speed: score maps → polygons / brush RLE / boxes / key points on 1-4 Mpx images.

Score maps look like GEM's: a coarse grid (28×28 tokens) of smooth random scores for each prompt,
upsampled bilinearly to the image size, so that the masks have a realistic number of blobs, holes and
fragments. Each row times ``regions_from_scores`` for one control type (3 labels, one prompt each), median
of ``--repeat`` runs, and reports regions and polygon vertices produced.

    .venv/bin/python benchmarks/regions_speed.py
    .venv/bin/python benchmarks/regions_speed.py --sizes 1000x1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from groundlabel.spec import ControlSpec, LabelingSpec  # noqa: E402
from workers.regions import regions_from_scores  # noqa: E402

LABELS = ["cat", "dog", "car"]
CONTROLS = ["PolygonLabels", "BrushLabels", "RectangleLabels", "KeyPointLabels"]


def score_maps(width: int, height: int, seed: int, grid: int = 28) -> dict[str, np.ndarray]:
    """GEM-like calibrated maps: smooth token-grid scores upsampled bilinearly."""
    rng = np.random.default_rng(seed)
    maps = {}
    for label in LABELS:
        coarse = cv2.GaussianBlur(rng.random((grid, grid)).astype(np.float32), (0, 0), 1.5)
        coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min() + 1e-9)
        maps[label] = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return maps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["1000x1000", "2000x1500", "2000x2000"], help="image sizes WxH"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        maps = score_maps(width, height, args.seed)
        for kind in CONTROLS:
            control = ControlSpec("c", kind, "image", LABELS, {lab: [lab] for lab in LABELS}, {})
            spec = LabelingSpec("image", "image", [control])
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                results, _ = regions_from_scores(
                    spec, maps, width=width, height=height, threshold=args.threshold
                )
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            vertices = sum(len(r["value"].get("points", [])) for r in results)
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "megapixels": round(width * height / 1e6, 2),
                    "control": kind,
                    "median_s": round(med, 4),
                    "images_per_s": round(1.0 / med, 2),
                    "regions": len(results),
                    "regions_per_s": round(len(results) / med, 1),
                    "polygon_vertices": vertices,
                }
            )

    header = (
        f"{'size':>10} {'Mpx':>5} {'control':<16} {'median s':>9} {'img/s':>7} {'regions':>8} "
        f"{'regions/s':>10} {'vertices':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>10} {r['megapixels']:>5} {r['control']:<16} {r['median_s']:>9.4f} "
            f"{r['images_per_s']:>7.2f} {r['regions']:>8} {r['regions_per_s']:>10.1f} "
            f"{r['polygon_vertices']:>9}"
        )

    out = Path(__file__).resolve().parent / "results" / "regions_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "opencv_threads": cv2.getNumThreads(),
        "labels": LABELS,
        "threshold": args.threshold,
        "repeat": args.repeat,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
