"""Export speed: tasks per second for COCO and RefCOCO export of a synthetic Label Studio project.

Generates a JSON export of N tasks (640x480, ~3 regions per task: polygons and brush masks, each
with a per-region expression), writes it to disk, then times reading it and exporting it as COCO
(brush masks as RLE) and RefCOCO (brush masks as polygons) with ``--images none``.

    .venv/bin/python benchmarks/export_speed.py            # 10,000 tasks
    .venv/bin/python benchmarks/export_speed.py --tasks 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters import export_coco, export_refcoco, load_labelstudio_export  # noqa: E402
from exporters.synthetic import LABEL_CONFIG, make_export  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        tasks = make_export(args.tasks, regions_per_task=args.regions, seed=args.seed)
        gen_s = time.perf_counter() - t0
        src = tmp_path / "export.json"
        src.write_text(json.dumps(tasks))
        size_mb = src.stat().st_size / 1e6
        del tasks

        t0 = time.perf_counter()
        tasks = load_labelstudio_export(src)
        rows.append(("load JSON export", time.perf_counter() - t0, None))

        for name, fn, kwargs in (
            ("coco", export_coco, {}),
            ("refcoco", export_refcoco, {}),
        ):
            out = tmp_path / name
            t0 = time.perf_counter()
            summary = fn(tasks, out, label_config=LABEL_CONFIG, images="none", **kwargs)
            seconds = time.perf_counter() - t0
            rows.append((f"export {name}", seconds, summary.to_dict()["exported"]))

    n = args.tasks
    print(
        f"export speed: {n} tasks, {args.regions} regions/task (1 in 2 brush), 640x480, images none; "
        f"export file {size_mb:.1f} MB (generated in {gen_s:.1f} s)"
    )
    print(f"{'step':<20} {'seconds':>9} {'tasks/s':>10}  exported")
    result_rows = []
    for step, seconds, exported in rows:
        exp = (
            ""
            if exported is None
            else ", ".join(
                f"{k} {v}" for k, v in exported.items() if k in ("annotations", "refs", "sentences")
            )
        )
        print(f"{step:<20} {seconds:>9.2f} {n / seconds:>10.1f}  {exp}")
        result_rows.append(
            {
                "step": step,
                "seconds": round(seconds, 3),
                "tasks_per_s": round(n / seconds, 1),
                "exported": exported,
            }
        )
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "export_speed.json").write_text(
        json.dumps(
            {
                "tasks": n,
                "regions_per_task": args.regions,
                "image_size": [640, 480],
                "export_file_mb": round(size_mb, 1),
                "python": platform.python_version(),
                "cpu_threads": os.cpu_count(),
                "rows": result_rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
