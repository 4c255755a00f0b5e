"""Report speed: ``groundlabel report`` on a synthetic Label Studio export of pre-labelled, corrected tasks.

Generates a JSON export of N tasks (640x480; each with a prediction of 3 regions, brush masks and polygons in
turn, so half the regions are brush masks, and an annotation that started from it: one region kept, one
edited, one deleted on every other task, one added on every third; :func:`exporters.synthetic.
make_corrected_export`), then runs ``groundlabel report FILE --json OUT --jobs J`` as its own process for each
J asked (default 1 and 2: the goal is under 30 s on two cores), and checks that the report's kept, edited,
deleted and added counts are what the generator did.

Wall seconds depend on what else runs on the machine; CPU seconds (user + system of the process and its
workers) are recorded beside them. The compiled brush decoder is compiled once per machine (cached on disk)
by a warm-up run on a small file before the timings.

    .venv/bin/python benchmarks/report_speed.py                 # 10,000 tasks, --jobs 1 and 2
    .venv/bin/python benchmarks/report_speed.py --tasks 1000 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_rss_mib, write_result  # noqa: E402
from benchmarks.export_speed import run_timed  # noqa: E402
from exporters.synthetic import make_corrected_export  # noqa: E402

GOAL_SECONDS = 30.0


def report_cmd(src: Path, out: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "groundlabel", "report", str(src), "--json", str(out), "--jobs", str(jobs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to time (1 2)")
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tasks, done = make_corrected_export(args.tasks, regions_per_task=args.regions, seed=args.seed)
        src = tmp_path / "export.json"
        src.write_text(json.dumps(tasks))
        size_mb = src.stat().st_size / 1e6
        brush = sum(r["type"] == "brushlabels" for t in tasks for r in t["predictions"][0]["result"])
        regions = sum(len(t["predictions"][0]["result"]) for t in tasks)
        del tasks
        small = tmp_path / "small.json"
        small.write_text(json.dumps(make_corrected_export(5, seed=args.seed)[0]))
        run_timed(report_cmd(small, tmp_path / "warm.json", 1), ROOT)  # compiles and caches the decoder
        for jobs in args.jobs:
            out = tmp_path / f"report-{jobs}.json"
            wall, cpu = run_timed(report_cmd(src, out, jobs), ROOT)
            versions = json.loads(out.read_text())["versions"]
            counted = {k: sum(v[k] for v in versions) for k in done}
            rows.append(
                {
                    "jobs": jobs,
                    "wall_s": round(wall, 2),
                    "cpu_s": round(cpu, 2),
                    "tasks_per_s": round(args.tasks / wall, 1),
                    "counts_match": counted == done,
                    "under_goal": wall < GOAL_SECONDS,
                }
            )

    print(
        f"report speed: {args.tasks} tasks, {regions} predicted regions ({brush} brush masks), 640x480; "
        f"export file {size_mb:.1f} MB; {os.cpu_count()} CPU threads; goal < {GOAL_SECONDS:g} s"
    )
    print(f"{'jobs':>4} {'wall s':>7} {'CPU s':>7} {'tasks/s':>8} {'counts':>7} {'goal':>5}")
    for r in rows:
        print(
            f"{r['jobs']:>4} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} {r['tasks_per_s']:>8.1f} "
            f"{'ok' if r['counts_match'] else 'WRONG':>7} {'met' if r['under_goal'] else 'MISSED':>5}"
        )
    write_result(
        Path(__file__).resolve().parent / "results" / "report_speed.json",
        {
            "tasks": args.tasks,
            "regions_per_task": args.regions,
            "predicted_regions": regions,
            "brush_regions": brush,
            "image_size": [640, 480],
            "export_file_mb": round(size_mb, 1),
            "goal_s": GOAL_SECONDS,
            "generated_changes": done,
            "rows": rows,
            "benchmark_peak_rss_mib": round(peak_rss_mib(), 1),
        },
    )
    return 0 if all(r["counts_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
