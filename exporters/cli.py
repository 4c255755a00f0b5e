"""``groundlabel export``: Label Studio annotations to COCO, RefCOCO, gRefCOCO (and COCO back to
Label Studio import JSON). Heavy modules are imported inside the handler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError

FORMATS = ("coco", "refcoco", "grefcoco", "labelstudio")

_EPILOG = """\
input:
  INPUT is Label Studio's "JSON" export (tasks with annotations), or use --project N --url URL
  --api-key KEY (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) to read a project through the API
  (legacy tokens and personal access tokens both work). With --format labelstudio, INPUT is a
  COCO instances.json and the output is Label Studio import JSON with predictions.

output (--out DIR):
  coco       DIR/instances.json, DIR/images/
  refcoco    DIR/<dataset-name>/refs(unc|umd).p, DIR/<dataset-name>/instances.json,
             DIR/images/mscoco/images/train2014/   (the REFER API's and LAVT's layout)
  grefcoco   DIR/grefcoco/grefs(unc).json, DIR/grefcoco/instances.json, DIR/images/train2014/
  labelstudio DIR/tasks.json
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
  groundlabel export data/coco/instances.json --format labelstudio --out data/import \\
      --image-prefix /data/local-files/?d=photos/
"""


def register(subparsers: Any) -> None:
    """Add the ``export`` verb."""
    p = subparsers.add_parser(
        "export",
        help="export Label Studio annotations as COCO, RefCOCO or gRefCOCO",
        description="Export Label Studio annotations (a JSON export file or a project) as a COCO, "
        "RefCOCO or gRefCOCO dataset, or turn a COCO file into Label Studio import JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", nargs="?", help="Label Studio JSON export (or COCO json for --format labelstudio)"
    )
    p.add_argument("--format", "-f", choices=FORMATS, default="coco", help="output format (default: coco)")
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
    coco = p.add_argument_group("coco")
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
    ref = p.add_argument_group("refcoco / grefcoco")
    ref.add_argument("--dataset-name", help="folder name of the dataset (default: refcoco / grefcoco)")
    ref.add_argument(
        "--splits",
        choices=("unc", "umd"),
        default="unc",
        help="unc: train/val/testA/testB (default); umd: train/val/test",
    )
    ref.add_argument("--split-fractions", help="comma-separated fractions, e.g. 0.8,0.1,0.05,0.05")
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


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``groundlabel export``."""
    import json

    out = Path(args.out)
    if args.format == "labelstudio":
        from exporters.coco import coco_to_labelstudio

        if not args.input:
            raise UserError("--format labelstudio needs a COCO instances.json as INPUT")
        config = Path(args.label_config).read_text() if args.label_config else None
        tasks = coco_to_labelstudio(
            args.input,
            label_config=config,
            image_key=args.image_key,
            image_prefix=args.image_prefix,
            as_predictions=not args.as_annotations,
            model_version=args.model_version,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "tasks.json").write_text(json.dumps(tasks) + "\n", encoding="utf-8")
        key = "annotations" if args.as_annotations else "predictions"
        regions = sum(len(item["result"]) for t in tasks for item in t[key])
        print(f"wrote {len(tasks)} tasks with {regions} regions to {out / 'tasks.json'}")
        return 0

    from exporters import coco as coco_mod
    from exporters import refcoco as ref_mod
    from exporters.images import ImageResolver
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
    if args.allowed_hosts is None:
        args.allowed_hosts = ",".join(fetch.allowed_hosts)
    config = None
    if args.label_config:
        try:
            config = Path(args.label_config).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read --label-config {args.label_config}: {exc}") from exc
    client = None
    if args.project is not None:
        tasks, project_config, client = fetch_project(args.project, url=args.url, api_key=args.api_key)
        config = config or project_config
    else:
        tasks = load_labelstudio_export(args.input)
    if args.include_predictions and has_prediction_ids(tasks):
        from groundlabel.redaction import redact

        if client is None and args.url and args.api_key:
            from groundlabel.ls_client import make_client

            client = make_client(args.url, args.api_key)
        if client is not None:
            filled = fill_predictions(tasks, client, args.project)
            print(f"read {filled} prediction(s) listed by id through the API of {redact(args.url)}")
    resolver = ImageResolver(
        images_root=args.images_root,
        label_studio_url=args.url,
        api_key=args.api_key,
        allowed_hosts=args.allowed_hosts or "",
    )
    progress = not args.quiet and sys.stderr.isatty()
    common = dict(
        label_config=config,
        annotations=args.annotations,
        include_predictions=args.include_predictions,
        images=args.images,
        resolver=resolver,
        image_key=args.image_key,
        progress=progress,
        polygon_tolerance=args.polygon_tolerance,
    )
    if args.format == "coco":
        summary = coco_mod.export_coco(tasks, out, brush_format=args.brush_format, **common)
    else:
        fn = ref_mod.export_refcoco if args.format == "refcoco" else ref_mod.export_grefcoco
        summary = fn(
            tasks,
            out,
            dataset_name=args.dataset_name or args.format,
            split_by=args.splits,
            fractions=_fractions(args.split_fractions),
            seed=args.seed,
            text_from=args.text_from,
            expression_key=args.expression_key,
            **common,
        )
    print(summary.format_text())
    print(f"summary written to {out / 'export_summary.json'}")
    return 0
