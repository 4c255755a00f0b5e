"""``groundlabel export``: Label Studio annotations to the formats of :mod:`exporters.registry` (COCO,
RefCOCO, gRefCOCO, YOLO; and COCO back to Label Studio import JSON).

The command line becomes one :class:`~exporters.registry.ExportOptions` and the format's exporter runs;
heavy modules are imported only then."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporters.registry import ExportOptions, exporter_names, get_exporter, layout_help
from groundlabel.errors import UserError

_EPILOG = """\
input:
  INPUT is Label Studio's "JSON" export (tasks with annotations), or use --project N --url URL
  --api-key KEY (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) to read a project through the API
  (legacy tokens and personal access tokens both work). With --format labelstudio, INPUT is a
  COCO instances.json and the output is Label Studio import JSON with predictions.

output (--out DIR):
{layout}
  Every run writes DIR/export_summary.json: what was exported and what was skipped, and why.

images:
  /data/local-files/?d=REL is read from --images-root/REL (Label Studio's
  LOCAL_FILES_DOCUMENT_ROOT); /data/upload/... from --images-root (the upload, media or data
  folder); anything not found locally is downloaded from Label Studio when --url is known.
  http(s) URLs in the export are downloaded; their redirects must stay on Label Studio or lead to
  --allowed-hosts (Label Studio's own redirects to presigned storage are followed).

examples:
  groundlabel export project.json --format coco --out data/coco --images-root ~/photos
  groundlabel export --project 3 --url http://localhost:8080 --format refcoco --out data/ref
  groundlabel export project.json --format yolo-seg --out data/yolo --split-fractions 0.9,0.1
  groundlabel export data/coco/instances.json --format labelstudio --out data/import \\
      --image-prefix /data/local-files/?d=photos/
"""


def register(subparsers: Any) -> None:
    """Add the ``export`` verb."""
    p = subparsers.add_parser(
        "export",
        help="export Label Studio annotations as COCO, RefCOCO, gRefCOCO or YOLO",
        description="Export Label Studio annotations (a JSON export file or a project) as a COCO, "
        "RefCOCO, gRefCOCO or Ultralytics YOLO dataset, or turn a COCO file into Label Studio import JSON.",
        epilog=_EPILOG.format(layout=layout_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", nargs="?", help="Label Studio JSON export (or COCO json for --format labelstudio)"
    )
    p.add_argument(
        "--format", "-f", choices=exporter_names(), default="coco", help="output format (default: coco)"
    )
    p.add_argument("--out", "-o", required=True, help="output folder")
    src = p.add_argument_group("reading a project through the API")
    src.add_argument("--project", type=int, help="Label Studio project id (instead of INPUT)")
    src.add_argument(
        "--url", default=None, help="Label Studio URL [LABEL_STUDIO_URL]"
    )
    src.add_argument(
        "--api-key",
        default=None,
        help="legacy token or personal access token [LABEL_STUDIO_API_KEY]",
    )
    sel = p.add_argument_group("what to export")
    sel.add_argument("--label-config", help="label config XML file: categories in its order, checks controls")
    sel.add_argument(
        "--annotations",
        choices=("latest", "ground-truth", "all"),
        default="latest",
        help="which annotation of a task: the latest updated (default), the ground-truth "
        "ones (tasks without one are skipped), or all; cancelled ones never count",
    )
    sel.add_argument(
        "--include-predictions",
        action="store_true",
        help="use a task's predictions when it has no annotation (all of them with --annotations all); "
        "predictions that a JSON export lists by id are read through the API (--project, or --url and "
        "--api-key)",
    )
    sel.add_argument(
        "--image-key",
        help="task data field holding the image (default: from the label config, "
        "else 'image', else the only text field)",
    )
    img = p.add_argument_group("images")
    img.add_argument(
        "--images",
        choices=("copy", "link", "none"),
        default="copy",
        help="copy images into the dataset (default), symlink them, or write annotations only",
    )
    img.add_argument("--images-root", help="local folder that Label Studio image URLs resolve against")
    img.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated hosts (host, host:port, *.domain, *) that image downloads may be redirected "
        "to, besides Label Studio; a private address only when listed by name [GROUNDLABEL_ALLOWED_HOSTS]",
    )
    coco = p.add_argument_group("coco (and the polygons of refcoco, grefcoco, yolo-seg)")
    coco.add_argument(
        "--brush-format",
        choices=("rle", "polygon"),
        default="rle",
        help="brush masks as COCO RLE with iscrowd 0 (default) or as outline polygons",
    )
    coco.add_argument(
        "--polygon-tolerance",
        type=float,
        default=0.0,
        help="simplify polygons made from brush masks by this many pixels (default 0: exact)",
    )
    ref = p.add_argument_group("refcoco / grefcoco (splits: also yolo)")
    ref.add_argument("--dataset-name", help="folder name of the dataset (default: refcoco / grefcoco)")
    ref.add_argument(
        "--splits",
        choices=("unc", "umd"),
        default="unc",
        help="unc: train/val/testA/testB (default); umd: train/val/test",
    )
    ref.add_argument(
        "--split-fractions",
        help="comma-separated fractions, e.g. 0.8,0.1,0.05,0.05; yolo: train,val (default 0.8,0.2)",
    )
    ref.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    ref.add_argument(
        "--text-from",
        help="the one TextArea whose texts are expressions (default: per-region texts of every TextArea "
        "and per-task texts of the label config's first one; every TextArea without a config)",
    )
    ref.add_argument(
        "--expression-key", help="task data field with an expression, used when the annotation has none"
    )
    ls = p.add_argument_group("labelstudio (COCO to Label Studio import JSON)")
    ls.add_argument(
        "--image-prefix", help="prefix for COCO file names in task data, e.g. /data/local-files/?d=ds/"
    )
    ls.add_argument("--as-annotations", action="store_true", help="write annotations instead of predictions")
    ls.add_argument("--model-version", default="coco-import", help="model_version of the predictions")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_export)


def _fractions(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--split-fractions must be comma-separated numbers, got {text!r}") from exc


def options_from_args(args: argparse.Namespace, config: str | None, resolver: Any = None) -> ExportOptions:
    """The command line's options as one :class:`ExportOptions`."""
    return ExportOptions(
        label_config=config,
        annotations=args.annotations,
        include_predictions=args.include_predictions,
        image_key=args.image_key,
        text_from=args.text_from,
        expression_key=args.expression_key,
        images=args.images,
        resolver=resolver,
        brush_format=args.brush_format,
        polygon_tolerance=args.polygon_tolerance,
        dataset_name=args.dataset_name or None,
        split_by=args.splits,
        fractions=_fractions(args.split_fractions),
        seed=args.seed,
        image_prefix=args.image_prefix,
        as_predictions=not args.as_annotations,
        model_version=args.model_version,
        progress=not args.quiet and sys.stderr.isatty(),
    )


def _read_config(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read --label-config {path}: {exc}") from exc


def read_input(
    args: argparse.Namespace, *, predictions: bool, say: Callable[[str], object] = print
) -> tuple[list[dict[str, Any]], str | None]:
    """``(tasks, label config)`` of INPUT (a Label Studio JSON export) or of ``--project`` read through the
    API (its label config; None for a file). ``--url``, ``--api-key`` and ``--allowed-hosts`` default to the
    settings' (``args`` is updated). With ``predictions``, predictions that a JSON export lists by id are read
    through the API when ``--project``, or ``--url`` and ``--api-key``, say where (``say`` tells how many)."""
    from exporters.labelstudio import (
        fetch_project,
        fill_predictions,
        has_prediction_ids,
        load_labelstudio_export,
    )
    from groundlabel.settings import Settings

    if (args.input is None) == (args.project is None):
        raise UserError("give either INPUT (a Label Studio JSON export) or --project N")
    fetch = Settings.from_env().fetch  # the defaults of --url, --api-key and --allowed-hosts
    args.url = args.url or fetch.label_studio_url
    args.api_key = args.api_key or fetch.api_key
    if getattr(args, "allowed_hosts", "") is None:
        args.allowed_hosts = ",".join(fetch.allowed_hosts)
    client = None
    config = None
    if args.project is not None:
        tasks, config, client = fetch_project(args.project, url=args.url, api_key=args.api_key)
    else:
        tasks = load_labelstudio_export(args.input)
    if predictions and has_prediction_ids(tasks):
        from groundlabel.redaction import redact

        if client is None and args.url and args.api_key:
            from groundlabel.ls_client import make_client

            client = make_client(args.url, args.api_key)
        if client is not None:
            filled = fill_predictions(tasks, client, args.project)
            say(f"read {filled} prediction(s) listed by id through the API of {redact(args.url)}")
    return tasks, config


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``groundlabel export``: the format's exporter (:func:`exporters.registry.get_exporter`)
    on the export file or the project's tasks."""
    out = Path(args.out)
    exporter = get_exporter(args.format)
    if exporter.reads == "coco":
        if not args.input:
            raise UserError(f"--format {exporter.name} needs a COCO instances.json as INPUT")
        print(exporter.load()(args.input, out, options_from_args(args, _read_config(args.label_config))))
        return 0

    from exporters.images import ImageResolver

    config = _read_config(args.label_config)
    tasks, project_config = read_input(args, predictions=args.include_predictions)
    config = config or project_config
    resolver = ImageResolver(
        images_root=args.images_root,
        label_studio_url=args.url,
        api_key=args.api_key,
        allowed_hosts=args.allowed_hosts or "",
    )
    summary = exporter.load()(tasks, out, options_from_args(args, config, resolver))
    print(summary.format_text())
    print(f"summary written to {out / 'export_summary.json'}")
    return 0
