"""COCO instances from Label Studio annotations, and COCO back to Label Studio import JSON.

:func:`export_coco` writes ``<out>/instances.json`` and ``<out>/images/``. Polygons stay polygons
(percent to pixels), rectangles become a bbox plus a 4-point polygon, brush masks become compressed
COCO RLE with ``iscrowd: 0`` (pycocotools' ``annToMask`` and COCOeval read that) or polygons with
``brush_format="polygon"``. ``area`` and ``bbox`` are pycocotools' ``area``/``toBbox`` of the
segmentation's mask, except that a rectangle keeps the exact box the annotator drew.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_encode, make_result, pixels_to_percent
from groundlabel.spec import LabelingSpec

from . import geometry
from .labelstudio import ImageRecord, Region, spec_from_config
from .registry import ExportOptions, export_options
from .steps import finish, read_and_place, without_gc, write_json
from .summary import ExportSummary


def _ls_meta(rec: ImageRecord, region: Region) -> dict[str, Any]:
    return {
        "task_id": rec.task_id,
        "origin": rec.origin,
        "region_id": region.region_id,
        "from_name": region.from_name,
        "to_name": region.to_name,
        "type": region.kind,
    }


def build_coco(
    records: Sequence[ImageRecord],
    categories: Sequence[str],
    file_names: dict[int, str],
    summary: ExportSummary,
    *,
    brush_format: str = "rle",
    polygon_tolerance: float = 0.0,
    description: str = "Label Studio annotations exported by groundlabel",
) -> tuple[dict[str, Any], dict[tuple[int, str], int]]:
    """The COCO dict and ``{(record index, region id): annotation id}``.

    ``brush_format="polygon"`` turns brush masks into outline polygons (what RefCOCO readers need).
    """
    if brush_format not in ("rle", "polygon"):
        raise UserError(f"brush format must be 'rle' or 'polygon', got {brush_format!r}")
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    images: dict[int, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    ann_ids: dict[tuple[int, str], int] = {}
    for index, rec in enumerate(records):
        if rec.image_id not in images:
            images[rec.image_id] = {
                "id": rec.image_id,
                "file_name": file_names[rec.image_id],
                "width": rec.width,
                "height": rec.height,
                "labelstudio": {"task_id": rec.task_id, "image": rec.image_ref},
            }
        for region in rec.regions:
            where = f"task {rec.task_id or rec.image_id} {rec.origin} region {region.region_id}"
            if region.label not in cat_ids:
                summary.skip("label not in the categories", where, repr(region.label))
                continue
            bbox, area = region.bbox, region.area
            if region.kind != "brush":
                segmentation: Any = region.polygons
            elif brush_format == "polygon":
                segmentation = geometry.rle_to_polygons(region.rle, tolerance=polygon_tolerance)
                if not segmentation:
                    summary.skip(
                        "empty mask", where, "no outline with 3 points left after polygon conversion"
                    )
                    continue
                area, bbox = geometry.measure(geometry.rle_from_polygons(segmentation, rec.width, rec.height))
                if area <= 0:
                    summary.skip("empty mask", where, "the outline polygons cover no pixel")
                    continue
            else:
                segmentation = geometry.rle_to_json(region.rle)
            ann_id = len(annotations) + 1
            ann: dict[str, Any] = {
                "id": ann_id,
                "image_id": rec.image_id,
                "category_id": cat_ids[region.label],
                "segmentation": segmentation,
                "area": int(area),
                "bbox": [round(float(v), 3) for v in bbox],
                "iscrowd": 0,
                "labelstudio": _ls_meta(rec, region),
            }
            if region.score is not None:
                ann["score"] = region.score
            annotations.append(ann)
            ann_ids[(index, region.region_id)] = ann_id
            summary.count(f"{region.kind} regions")
    coco = {
        "info": {
            "description": description,
            "version": "1.0",
            "contributor": "groundlabel",
            "date_created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": list(images.values()),
        "categories": [{"id": cat_ids[n], "name": n, "supercategory": n} for n in categories],
        "annotations": annotations,
    }
    return coco, ann_ids


@without_gc
def export_coco(
    tasks: Sequence[dict[str, Any]],
    out_dir: str | Path,
    options: ExportOptions | None = None,
    **changes: Any,
) -> ExportSummary:
    """Write ``<out_dir>/instances.json`` (COCO instances) and the images into ``<out_dir>/images``.

    ``tasks`` is Label Studio's JSON export (a list of tasks); ``options`` and ``changes`` (its field
    names: ``label_config=``, ``images="none"``, ``brush_format="polygon"``...) say what to export. Returns
    the summary (also written to ``<out_dir>/export_summary.json``).
    """
    options = export_options(options, changes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary("coco")
    records, categories, names = read_and_place(tasks, summary, options, out / "images")
    coco, _ = build_coco(
        records,
        categories,
        names,
        summary,
        brush_format=options.brush_format,
        polygon_tolerance=options.polygon_tolerance,
    )
    write_json(coco, out / "instances.json")
    return finish_coco(summary, coco, out)


def finish_coco(summary: ExportSummary, coco: dict[str, Any], out: Path) -> ExportSummary:
    """:func:`~exporters.steps.finish` with the COCO dict's images, annotations and categories."""
    return finish(summary, out, **{key: len(coco[key]) for key in ("images", "annotations", "categories")})


# ---------------------------------------------------------------------------------------------------
# COCO -> Label Studio


def _pick_control(spec: LabelingSpec | None, result_type: str, label: str) -> tuple[str, str] | None:
    if spec is None:
        return None
    for control in spec.controls:
        if control.result_type == result_type and label in control.labels:
            return control.name, control.to_name
    return None


def _rectangle_value(poly: Sequence[float], width: int, height: int) -> dict[str, float]:
    (x0, y0), (x1, y1), _, (x3, y3) = [(poly[i], poly[i + 1]) for i in range(0, 8, 2)]
    w = math.hypot(x1 - x0, y1 - y0)
    h = math.hypot(x3 - x0, y3 - y0)
    rotation = math.degrees(math.atan2(y1 - y0, x1 - x0)) % 360.0
    if abs(rotation - 360.0) < 1e-6:
        rotation = 0.0
    return {
        "x": round(x0 * 100.0 / width, 4),
        "y": round(y0 * 100.0 / height, 4),
        "width": round(w * 100.0 / width, 4),
        "height": round(h * 100.0 / height, 4),
        "rotation": round(rotation, 4),
    }


def coco_to_labelstudio(
    coco: dict[str, Any] | str | Path,
    *,
    label_config: str | LabelingSpec | None = None,
    image_key: str | None = None,
    image_prefix: str | None = None,
    as_predictions: bool = True,
    model_version: str = "coco-import",
    from_name: str = "label",
    to_name: str = "image",
) -> list[dict[str, Any]]:
    """Label Studio import JSON (a task list) from a COCO instances dict or file.

    Each COCO image becomes a task (``data[image_key]`` is the original Label Studio reference when the
    COCO file came from :func:`export_coco`, else ``image_prefix + file_name``); each annotation a
    region: rectangles (recorded as such by :func:`export_coco`) as ``rectanglelabels``, single
    polygons as ``polygonlabels``, RLE masks and multi-part polygons as ``brushlabels`` (one region per
    instance). Results go under ``predictions`` (or ``annotations`` with ``as_predictions=False``).
    Control names come from the label config when given, else from the COCO file's records, else
    ``from_name``/``to_name``.
    """
    if not isinstance(coco, dict):
        path = Path(coco)
        try:
            coco = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read COCO file {path}: {exc}") from exc
    if not isinstance(coco, dict) or not all(
        isinstance(coco.get(k), list) for k in ("images", "annotations")
    ):
        raise UserError("a COCO file needs 'images' and 'annotations' lists")
    spec = label_config if isinstance(label_config, LabelingSpec) else spec_from_config(label_config)
    key = image_key or (spec.image_key if spec else "image")
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    tasks = []
    for img in coco["images"]:
        width, height = int(img["width"]), int(img["height"])
        meta = img.get("labelstudio") or {}
        ref = (
            meta.get("image")
            if image_prefix is None and meta.get("image")
            else (image_prefix or "") + img["file_name"]
        )
        results = []
        for ann in by_image.get(img["id"], []):
            label = cats.get(ann.get("category_id"))
            if label is None:
                raise UserError(
                    f"annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}"
                )
            ann_meta = ann.get("labelstudio") or {}
            seg = ann.get("segmentation")
            if (
                ann_meta.get("type") == "rectangle"
                and isinstance(seg, list)
                and len(seg) == 1
                and len(seg[0]) == 8
            ):
                rtype, value = "rectanglelabels", _rectangle_value(seg[0], width, height)
            elif isinstance(seg, list) and len(seg) == 1:
                rtype = "polygonlabels"
                value = {"points": pixels_to_percent(seg[0], width, height), "closed": True}
            elif seg:
                mask = geometry.decode_segmentation(seg, width, height)
                rtype, value = "brushlabels", {"format": "rle", "rle": brush_rle_encode(mask)}
            else:
                raise UserError(f"annotation {ann.get('id')} has no segmentation")
            value[rtype] = [label]
            names = _pick_control(spec, rtype, label) or (
                (ann_meta["from_name"], ann_meta.get("to_name") or to_name)
                if ann_meta.get("from_name")
                else (from_name, to_name)
            )
            result = make_result(
                from_name=names[0],
                to_name=names[1],
                result_type=rtype,
                value=value,
                width=width,
                height=height,
                score=ann.get("score"),
            )
            if ann_meta.get("region_id"):
                result["id"] = str(ann_meta["region_id"])
            results.append(result)
        item = {"result": results}
        if as_predictions:
            item["model_version"] = model_version
            scores = [r["score"] for r in results if "score" in r]
            if scores:
                item["score"] = round(sum(scores) / len(scores), 4)
        tasks.append({"data": {key: ref}, ("predictions" if as_predictions else "annotations"): [item]})
    return tasks


def write_labelstudio(source: str | Path, out_dir: str | Path, options: ExportOptions) -> str:
    """``--format labelstudio``: :func:`coco_to_labelstudio` of the COCO file ``source`` written to
    ``<out_dir>/tasks.json``; returns the line to print."""
    tasks = coco_to_labelstudio(
        source,
        label_config=options.label_config,
        image_key=options.image_key,
        image_prefix=options.image_prefix,
        as_predictions=options.as_predictions,
        model_version=options.model_version,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps(tasks) + "\n", encoding="utf-8")
    key = "predictions" if options.as_predictions else "annotations"
    regions = sum(len(item["result"]) for t in tasks for item in t[key])
    return f"wrote {len(tasks)} tasks with {regions} regions to {out / 'tasks.json'}"
