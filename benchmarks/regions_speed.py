"""Region conversion speed: score maps → polygons / brush RLE / boxes / key points, next to OpenCV anchors.

Score maps look like GEM's: a coarse grid (28×28 tokens) of smooth random scores for each prompt,
upsampled bilinearly to the image size, so that the masks have a realistic number of blobs, holes and
fragments. Each row times ``regions_from_scores`` for one control type (N labels, one prompt each),
median of ``--repeat`` runs, next to its anchor on the same maps in the same run: the plain OpenCV way
to the same output (best label by ``np.argmax`` over the stacked maps, then per label the mask, and
``findContours`` + ``approxPolyDP`` for polygons, ``connectedComponentsWithStats`` for boxes and brush
masks (plus the RLE encoding), a masked argmax for key points). The two run in turn; ``ratio`` is ours /
anchor in CPU seconds (wall seconds, also shown, swing with whatever else runs on the machine).

    .venv/bin/python benchmarks/regions_speed.py                 # 1 and 4 Mpx, 5 and 20 labels
    .venv/bin/python benchmarks/regions_speed.py --sizes 1000x1000 --labels 5 --repeat 3
    .venv/bin/python benchmarks/regions_speed.py --area-sweep 0.01 0.1 0.5 1   # regions in a part only

``--area-sweep F...`` adds rows at the last size and label count where every map is zero outside a
centred square of fraction F of the image: the regions' area shrinks while the image and the number of
labels stay, to show what grows with what.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from groundlabel.ls_format import brush_rle_encode  # noqa: E402
from groundlabel.spec import ControlSpec, LabelingSpec  # noqa: E402
from workers.regions import regions_from_scores  # noqa: E402

CONTROLS = ["PolygonLabels", "BrushLabels", "RectangleLabels", "KeyPointLabels"]


def score_maps(width: int, height: int, labels: int, seed: int, grid: int = 28) -> dict[str, np.ndarray]:
    """GEM-like calibrated maps: smooth token-grid scores upsampled bilinearly."""
    rng = np.random.default_rng(seed)
    maps = {}
    for i in range(labels):
        coarse = cv2.GaussianBlur(rng.random((grid, grid)).astype(np.float32), (0, 0), 1.5)
        coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min() + 1e-9)
        maps[f"label{i}"] = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return maps


def confine(maps: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """The maps with every score outside a centred square of ``fraction`` of the image set to 0."""
    height, width = next(iter(maps.values())).shape
    side_x, side_y = max(1, round(width * fraction**0.5)), max(1, round(height * fraction**0.5))
    x0, y0 = (width - side_x) // 2, (height - side_y) // 2
    inside = np.zeros((height, width), np.float32)
    inside[y0 : y0 + side_y, x0 : x0 + side_x] = 1.0
    return {name: m * inside for name, m in maps.items()}  # written in full, as a model's maps are


def anchor(kind: str, maps: dict[str, np.ndarray], threshold: float, min_area: float) -> int:
    """The plain OpenCV conversion of the same maps; returns the number of regions."""
    stack = np.stack(list(maps.values()))
    best, index = stack.max(axis=0), stack.argmax(axis=0)
    foreground = best >= threshold
    regions = 0
    for i in range(len(maps)):
        mask = (foreground & (index == i)).astype(np.uint8)
        if kind == "PolygonLabels":
            contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
            for c in contours:
                if cv2.contourArea(c) >= min_area:
                    cv2.approxPolyDP(c, 1.0, True)
                    regions += 1
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        kept = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= min_area]
        if kind == "RectangleLabels":
            regions += len(kept)
        elif kind == "BrushLabels" and kept:
            brush_rle_encode(mask)
            regions += 1
        elif kind == "KeyPointLabels" and kept:
            int(np.argmax(np.where(mask > 0, best, -np.inf)))
            regions += 1
    return regions


def timed_pair(ours, base, repeat: int) -> tuple[float, float, float, float, object, object]:
    """Median wall and CPU seconds of ``ours`` and ``base``, run in turn (so that both see the same load):
    ``(ours wall, ours CPU, base wall, base CPU, ours' output, base's output)``."""
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    outs: dict[str, object] = {}
    for _ in range(repeat):
        for name, fn in (("ours", ours), ("base", base)):
            w0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    med = {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()
    }
    return (*med["ours"], *med["base"], outs["ours"], outs["base"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1000x1000", "2000x2000"], help="image sizes WxH")
    parser.add_argument("--labels", nargs="+", type=int, default=[5, 20], help="labels per control")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--area-sweep", nargs="*", type=float, default=[], metavar="F")
    args = parser.parse_args()

    cases = [
        (*(int(v) for v in size.lower().split("x")), n_labels, 1.0)
        for size in args.sizes
        for n_labels in args.labels
    ]
    cases += [(*cases[-1][:3], f) for f in args.area_sweep]

    rows = []
    for width, height, n_labels, fraction in cases:
        maps = score_maps(width, height, n_labels, args.seed)
        if fraction < 1:
            maps = confine(maps, fraction)
        names = list(maps)
        for kind in CONTROLS:
            control = ControlSpec("c", kind, "image", names, {lab: [lab] for lab in names}, {})
            spec = LabelingSpec("image", "image", [control])
            min_area = 0.0001 * width * height
            regions_from_scores(spec, maps, width=width, height=height, threshold=args.threshold)  # warm
            ours, ours_cpu, base, base_cpu, (results, _), base_regions = timed_pair(
                lambda spec=spec, maps=maps, w=width, h=height: regions_from_scores(
                    spec, maps, width=w, height=h, threshold=args.threshold
                ),
                lambda kind=kind, maps=maps, a=min_area: anchor(kind, maps, args.threshold, a),
                args.repeat,
            )
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "megapixels": round(width * height / 1e6, 2),
                    "labels": n_labels,
                    "area_fraction": fraction,
                    "control": kind,
                    "median_s": round(ours, 4),
                    "anchor_s": round(base, 4),
                    "cpu_s": round(ours_cpu, 4),
                    "anchor_cpu_s": round(base_cpu, 4),
                    "ratio": round(ours_cpu / base_cpu, 2),
                    "regions": len(results),
                    "anchor_regions": base_regions,
                    "polygon_vertices": sum(len(r["value"].get("points", [])) for r in results),
                }
            )

    header = (
        f"{'size':>10} {'Mpx':>5} {'labels':>6} {'area':>5} {'control':<16} {'ours ms':>8} {'anchor ms':>10} "
        f"{'CPU ms':>7} {'anchor CPU':>10} {'ratio':>6} {'regions':>8} {'anchor':>7} {'vertices':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>10} {r['megapixels']:>5} {r['labels']:>6} {r['area_fraction']:>5} "
            f"{r['control']:<16} "
            f"{1000 * r['median_s']:>8.1f} {1000 * r['anchor_s']:>10.1f} {1000 * r['cpu_s']:>7.1f} "
            f"{1000 * r['anchor_cpu_s']:>10.1f} {r['ratio']:>6.2f} "
            f"{r['regions']:>8} {r['anchor_regions']:>7} {r['polygon_vertices']:>9}"
        )
    print(f"worst ratio: {max(r['ratio'] for r in rows):.2f}")

    out = Path(__file__).resolve().parent / "results" / "regions_speed.json"
    meta = {
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "opencv_threads": cv2.getNumThreads(),
        "labels": args.labels,
        "threshold": args.threshold,
        "repeat": args.repeat,
        "area_sweep": args.area_sweep,
    }
    write_result(out, {"meta": meta, "rows": rows})
    print(f"\nwritten {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
