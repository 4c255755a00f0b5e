"""Export speed: `groundlabel export --format coco` of a synthetic Label Studio project, before and after,
next to Label Studio SDK's ``Converter.convert_to_coco`` on the same file, in one run.

Generates a JSON export of N tasks (640x480, 3 regions per task: polygons and brush masks in turn, each
with a per-region expression), then runs, each as its own process on that file, with ``--images none``:

- ``after``: ``groundlabel export --format coco`` of this checkout (and ``--format refcoco``);
- ``before``: the same command of an earlier revision (``--baseline``, default the last one before the
  compiled brush decoder), extracted with ``git archive``; its ``instances.json`` is compared with this
  checkout's byte for byte (all but ``date_created``);
- ``label-studio-sdk``: ``Converter(config).convert_to_coco`` (it drops every brush mask: only the
  polygons are converted).

Wall seconds depend on what else runs on the machine; CPU seconds (user + system of the process) and
the ratios are the figures to compare. The compiled loops are compiled once per machine (cached on disk)
by a warm-up run on a small file before the timings.

    .venv/bin/python benchmarks/export_speed.py                # 10,000 tasks
    .venv/bin/python benchmarks/export_speed.py --tasks 500 --skip-before
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from exporters.synthetic import LABEL_CONFIG, make_export  # noqa: E402

#: The last revision before the export speed-ups (compiled brush decoder, COCO RLE encoder, orjson).
BASELINE = "7b9a24a"

SDK_CODE = """
import sys
from label_studio_sdk.converter import Converter
config, src, out = sys.argv[1:4]
Converter(open(config).read(), project_dir=None, download_resources=False).convert_to_coco(
    input_data=src, output_dir=out, is_dir=False)
"""


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd``; return ``(wall seconds, CPU seconds)`` of the child (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def export_cmd(src: Path, out: Path, config: Path, fmt: str = "coco") -> list[str]:
    return [sys.executable, "-m", "groundlabel", "export", str(src), "--format", fmt, "--out", str(out),
            "--images", "none", "--label-config", str(config), "--quiet"]


def without_date(path: Path) -> bytes:
    return re.sub(rb'"date_created":"[^"]*"', b"", path.read_bytes())


def extract_revision(rev: str, dest: Path) -> bool:
    """Write the tree of ``rev`` into ``dest`` (False when git or the revision is not available)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default=BASELINE, help=f"revision timed as 'before' ({BASELINE})")
    parser.add_argument("--skip-before", action="store_true", help="do not time the baseline revision")
    parser.add_argument("--skip-sdk", action="store_true", help="do not time label-studio-sdk's converter")
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    identical: bool | None = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        config = tmp_path / "config.xml"
        config.write_text(LABEL_CONFIG)
        src = tmp_path / "export.json"
        src.write_text(json.dumps(make_export(args.tasks, regions_per_task=args.regions, seed=args.seed)))
        size_mb = src.stat().st_size / 1e6
        small = tmp_path / "small.json"
        small.write_text(json.dumps(make_export(5, regions_per_task=args.regions, seed=args.seed)))
        run_timed(export_cmd(small, tmp_path / "warm", config), ROOT)  # compiles and caches the loops
        run_timed(export_cmd(small, tmp_path / "warm-ref", config, "refcoco"), ROOT)  # and the tracer's

        def add(tool: str, what: str, wall: float, cpu: float) -> None:
            rows.append({"tool": tool, "what": what, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "tasks_per_cpu_s": round(args.tasks / cpu, 1)})

        if not args.skip_before:
            old = tmp_path / "baseline"
            old.mkdir()
            if extract_revision(args.baseline, old):
                env = {**os.environ, "PYTHONPATH": str(old)}
                wall, cpu = run_timed(export_cmd(src, tmp_path / "before", config), old, env)
                add(f"before ({args.baseline})", "groundlabel export --format coco", wall, cpu)
            else:
                print(f"(revision {args.baseline} not available: no 'before' row)")
        wall, cpu = run_timed(export_cmd(src, tmp_path / "after", config), ROOT)
        add("after", "groundlabel export --format coco", wall, cpu)
        if (tmp_path / "before" / "instances.json").is_file():
            identical = without_date(tmp_path / "before" / "instances.json") == without_date(
                tmp_path / "after" / "instances.json"
            )
        wall, cpu = run_timed(export_cmd(src, tmp_path / "after-ref", config, "refcoco"), ROOT)
        add("after", "groundlabel export --format refcoco", wall, cpu)
        if not args.skip_sdk:
            cmd = [sys.executable, "-c", SDK_CODE, str(config), str(src), str(tmp_path / "sdk")]
            wall, cpu = run_timed(cmd, ROOT)
            add("label-studio-sdk", "Converter.convert_to_coco (drops brush masks)", wall, cpu)
        annotations = len(json.loads((tmp_path / "after" / "instances.json").read_text())["annotations"])

    print(
        f"export speed: {args.tasks} tasks, {args.regions} regions/task (1 in 2 brush), 640x480, "
        f"images none; export file {size_mb:.1f} MB, {annotations} COCO annotations; "
        f"{os.cpu_count()} CPU threads"
    )
    print(f"{'tool':<20} {'what':<48} {'wall s':>7} {'CPU s':>7} {'tasks/CPU s':>12}")
    for r in rows:
        print(
            f"{r['tool']:<20} {r['what']:<48} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} "
            f"{r['tasks_per_cpu_s']:>12.1f}"
        )
    after = next(r for r in rows if r["tool"] == "after")
    for r in rows:
        if r is not after and "coco" in str(r["what"]) and "refcoco" not in str(r["what"]):
            print(f"{r['tool']} / after, CPU seconds: {float(r['cpu_s']) / float(after['cpu_s']):.2f}")
    if identical is not None:
        same = "identical" if identical else "DIFFERENT"
        print(f"instances.json of before and after: {same} (but the date)")

    write_result(
        Path(__file__).resolve().parent / "results" / "export_speed.json",
        {
            "tasks": args.tasks,
            "regions_per_task": args.regions,
            "image_size": [640, 480],
            "export_file_mb": round(size_mb, 1),
            "annotations": annotations,
            "baseline": args.baseline,
            "identical_to_baseline": identical,
            "rows": rows,
        },
    )
    return 0 if identical is not False else 1


if __name__ == "__main__":
    sys.exit(main())
