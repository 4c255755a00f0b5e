"""``groundlabel report``: how much annotators changed groundlabel's pre-labels, per model version, engine,
control and label, from a Label Studio project or its JSON export.

Each annotated task's latest submitted annotation is paired with the prediction it started from and measured
by :mod:`groundlabel.corrections` (mask IoU and boundary F of the brush and polygon masks per label, box IoU,
key-point distance, regions kept, edited, deleted and added, lead time). The figures go to the terminal as
a table, to JSON (``--json``), and to an HTML page with PNG plots (``--html DIR``,
:mod:`groundlabel_cli.report_html`). Large exports are measured by several processes (``--jobs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel_cli.report_html import GROUP_COLUMNS, VERSION_COLUMNS, table_rows

_EPILOG = """\
input:
  INPUT is Label Studio's "JSON" export (tasks with annotations and predictions), or use --project N
  --url URL --api-key KEY (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) to read a project through the
  API. Predictions that the export lists by id are read through the API (as export
  --include-predictions does).

what is measured (docs/report.md):
  each task's latest submitted annotation against the prediction it started from (its
  parent_prediction, else the task's latest prediction made before it): per control and label, the
  IoU of the brush and polygon masks and their boundary F at 2 px; per region, kept as predicted,
  edited, deleted or added (matched by region id, else by IoU >= 0.5), the box IoU of rectangles and
  the distance of key points; the lead time of tasks annotated from a prediction and without one.

examples:
  groundlabel report project.json
  groundlabel report --project 7 --url http://localhost:8080 --html report/
  groundlabel report project.json --json > quality.json
"""

#: The IoU distribution's bins in the JSON (tenths; the last bin holds 1.0).
HISTOGRAM_BINS = 10
#: Below this many tasks a single process measures them (starting workers costs more).
PARALLEL_FROM = 500


def register(subparsers: Any) -> None:
    """Add the ``report`` verb."""
    p = subparsers.add_parser(
        "report",
        help="measure how much annotators changed the pre-labels (IoU, kept/edited/deleted/added, lead time)",
        description="Pair every annotated task's latest submitted annotation with the prediction it started "
        "from and measure the corrections, per model version, engine, control and label.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="?", help="Label Studio JSON export")
    src = p.add_argument_group("reading a project through the API")
    src.add_argument("--project", type=int, help="Label Studio project id (instead of INPUT)")
    src.add_argument("--url", default=None, help="Label Studio URL [LABEL_STUDIO_URL]")
    src.add_argument(
        "--api-key", default=None, help="legacy token or personal access token [LABEL_STUDIO_API_KEY]"
    )
    out = p.add_argument_group("output (the table goes to the terminal unless --json writes to it)")
    out.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the figures as JSON to FILE (to the terminal instead of the table without FILE)",
    )
    out.add_argument("--html", metavar="DIR", help="write DIR/index.html with the figures and PNG plots")
    out.add_argument(
        "--per-task",
        action="store_true",
        help="add every task's measures to the JSON",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="processes that measure (default: one per CPU core available, at most 8)",
    )
    p.set_defaults(handler=run_report)


# ---------------------------------------------------------------------------------------------------
# Measuring

_TASKS: Sequence[dict[str, Any]] = ()


def _measure_range(bounds: tuple[int, int]) -> list[Any]:
    from groundlabel.corrections import measure_task

    return [m for t in _TASKS[bounds[0] : bounds[1]] if (m := measure_task(t)) is not None]


def default_jobs() -> int:
    """One process per CPU core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def measure_tasks(tasks: Sequence[dict[str, Any]], jobs: int = 1) -> list[Any]:
    """:func:`groundlabel.corrections.measure_task` of every task with a submitted annotation, in order.

    With ``jobs`` > 1 and many tasks, forked processes measure slices of the task list (inherited, not
    sent), and send back only the measures."""
    global _TASKS
    if jobs <= 1 or len(tasks) < PARALLEL_FROM or "fork" not in _start_methods():
        _TASKS = tasks
        try:
            return _measure_range((0, len(tasks)))
        finally:
            _TASKS = ()
    import multiprocessing

    import numpy as np

    from groundlabel.ls_format import brush_rle_decode, brush_rle_encode

    # the compiled decoder loaded once, before the fork, rather than once per process
    brush_rle_decode(brush_rle_encode(np.zeros((1, 1), bool)), 1, 1)
    step = max(1, math.ceil(len(tasks) / (jobs * 4)))  # a few slices per process: even finish times
    slices = [(i, min(i + step, len(tasks))) for i in range(0, len(tasks), step)]
    _TASKS = tasks
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.map(_measure_range, slices, chunksize=1)
    finally:
        _TASKS = ()
    return [m for part in parts for m in part]


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


# ---------------------------------------------------------------------------------------------------
# The report


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``values`` (in 0..1) in ``bins`` equal bins; 1.0 falls in the last."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    return counts


def build_report(
    tasks: Sequence[dict[str, Any]], measures: Sequence[Any], *, source: str, per_task: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(report, summary)``: the report's figures as a JSON-ready dict: ``tasks`` (counts), ``versions``
    and ``groups`` (:func:`groundlabel.corrections.summarise`; each group's IoUs as a histogram of tenths),
    ``errors`` (regions that could not be read, the first 20 with their task) and, with ``per_task``, every
    task's measures; and the summary itself (each group with its IoUs, for plots)."""
    from groundlabel.corrections import summarise

    summary = summarise(measures)
    groups = []
    for row in summary["groups"]:
        groups.append(
            {k: v for k, v in row.items() if k != "ious"} | {"iou_histogram": histogram(row["ious"])}
        )
    listed_by_id = sum(1 for t in tasks if any(isinstance(p, int) for p in t.get("predictions") or []))
    errors = [f"task {m.task}: {e}" for m in measures for e in m.errors]
    report: dict[str, Any] = {
        "source": source,
        "tasks": {
            "read": len(tasks),
            "annotated": len(measures),
            "from_prediction": sum(1 for m in measures if m.from_prediction),
            "without_prediction": sum(1 for m in measures if not m.from_prediction),
            "predictions_listed_by_id": listed_by_id,
        },
        "versions": summary["versions"],
        "groups": groups,
        "errors": {"count": len(errors), "first": errors[:20]},
    }
    if per_task:
        report["per_task"] = [m.to_dict() for m in measures]
    return report, summary


def _table(columns: Sequence[tuple[str, str, str]], rows: list[list[str]]) -> list[str]:
    """Aligned columns: text to the left, figures to the right."""
    header = [h for h, _, _ in columns]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    left = [form == "text" for _, _, form in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if ljust else c.rjust(w) for c, w, ljust in zip(cells, widths, left, strict=True)
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per model version, then one per version, control and label."""
    t = report["tasks"]
    lines = [
        f"{report['source']}: {t['read']} task(s), {t['annotated']} annotated: "
        f"{t['from_prediction']} from a prediction, {t['without_prediction']} without one",
    ]
    if t["predictions_listed_by_id"]:
        lines.append(
            f"  {t['predictions_listed_by_id']} task(s) list their predictions by id only: read the project "
            "with --project, or give --url and --api-key, to pair them"
        )
    lines += ["", *_table(VERSION_COLUMNS, table_rows(report["versions"], VERSION_COLUMNS))]
    if report["groups"]:
        lines += ["", *_table(GROUP_COLUMNS, table_rows(report["groups"], GROUP_COLUMNS))]
    if report["errors"]["count"]:
        lines.append("")
        lines.append(f"{report['errors']['count']} region(s) could not be measured, e.g.:")
        lines += [f"  {e}" for e in report["errors"]["first"][:5]]
    return "\n".join(lines)


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``groundlabel report``."""
    from groundlabel_cli.export import read_input

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    tasks, _ = read_input(args, predictions=True, say=say)
    jobs = args.jobs or default_jobs()
    if jobs < 0:
        raise UserError(f"--jobs must be positive, got {args.jobs}")
    measures = measure_tasks(tasks, jobs)
    source = f"project {args.project}" if args.project is not None else str(args.input)
    report, summary = build_report(tasks, measures, source=source, per_task=args.per_task)
    if args.html:
        from groundlabel_cli.report_html import write_html

        page = write_html(report, summary, Path(args.html))
        say(f"HTML report written to {page}")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        say(f"JSON written to {args.json}")
    print(format_table(report))
    return 0
