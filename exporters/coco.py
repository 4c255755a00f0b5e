"""COCO instances from Label Studio annotations, and COCO back to Label Studio import JSON.

:func:`export_coco` writes ``<out>/instances.json`` and ``<out>/images/``. Polygons stay polygons
(percent to pixels), rectangles become a bbox plus a 4-point polygon, brush masks become compressed
COCO RLE with ``iscrowd: 0`` (pycocotools' ``annToMask`` and COCOeval read that) or polygons with
``brush_format="polygon"``. ``area`` and ``bbox`` are pycocotools' ``area``/``toBbox`` of the
segmentation's mask, except that a rectangle keeps the exact box the annotator drew.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_encode, make_result, pixels_to_percent
from groundlabel.spec import LabelingSpec

from . import geometry
from .images import IMAGE_MODES, ImageNotFound, ImageResolver, image_file_name
from .labelstudio import ImageRecord, Region, categories_for, read_tasks, spec_from_config
from .summary import ExportSummary


def place_images(
    records: list[ImageRecord],
    resolver: ImageResolver,
    images_dir: Path,
    mode: str,
    summary: ExportSummary,
    *,
    progress: bool = False,
) -> tuple[list[ImageRecord], dict[int, str]]:
    """Give each image a unique file name and copy/link it into ``images_dir``.

    Returns the records whose image could be placed and ``{image_id: file_name}``. With ``none``
    nothing is read or written and every record is kept.
    """
    if mode not in IMAGE_MODES:
        raise UserError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    from tqdm import tqdm

    names: dict[int, str] = {}
    taken: dict[str, str] = {}  # file name -> image reference
    failed: set[int] = set()
    for rec in tqdm(records, desc="images", unit="img", disable=not progress or mode == "none"):
        if rec.image_id in names or rec.image_id in failed:
            continue
        name = image_file_name(rec.image_ref)
        if taken.get(name, rec.image_ref) != rec.image_ref:
            name = f"{rec.image_id}_{name}"
        if mode != "none" and name not in taken:
            try:
                resolver.place(rec.image_ref, images_dir / name, mode)
            except ImageNotFound as exc:
                summary.skip("image not found", f"task {rec.task_id or rec.image_id}", str(exc))
                failed.add(rec.image_id)
                continue
            summary.count(f"images {'copied' if mode == 'copy' else 'linked'}")
        taken[name] = rec.image_ref
        names[rec.image_id] = name
    return [r for r in records if r.image_id not in failed], names


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


#: A number that ``json.dumps`` writes otherwise: below 1e-4 ``json`` writes ``1e-05``, orjson
#: ``0.00001`` or ``1e-5``.
_SMALL_NUMBER = re.compile(rb"[:,\[]-?(?:0\.0000|\d[\d.]*e-)")


def _unlike_json(raw: bytes) -> bool:
    """Whether orjson's text ``raw`` may differ from ``json.dumps``'s: a top-level scalar, ``null``
    (orjson also writes it for NaN and infinities, ``json`` writes ``NaN``, ``Infinity``) or a number
    below 1e-4. A match inside a string only sends the document the slow way."""
    if raw[:1] not in (b"{", b"[") or b"null" in raw:
        return True
    for needle in (b"e-", b"0.0000"):
        i = raw.find(needle)
        while i >= 0:
            if _SMALL_NUMBER.search(raw, max(0, i - 32), i + len(needle)):
                return True
            i = raw.find(needle, i + 1)
    return False


_NOT_ASCII = re.compile("[\x7f-\U0010ffff]")


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _orjson_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is left to the json module")


def dumps_compact(data: Any) -> str:
    """``json.dumps(data, separators=(",", ":"))``, the same text, written by orjson (10x faster on
    COCO polygons) when the document holds nothing that orjson writes differently; anything else
    (subclasses, dataclasses, dates, non-string keys, integers beyond 64 bits, numbers below 1e-4,
    ``null``/NaN) goes to ``json.dumps``. Non-ASCII characters are escaped as ``json`` escapes them."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson comes with the export extra
        orjson = None
    if orjson is not None:
        passthrough = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
        try:
            raw = orjson.dumps(
                data, default=_orjson_default, option=passthrough | orjson.OPT_PASSTHROUGH_DATETIME
            )
        except TypeError:
            raw = None
        if raw is not None and not _unlike_json(raw):
            text = raw.decode("utf-8")
            return text if text.isascii() and "\x7f" not in text else _NOT_ASCII.sub(_json_escape, text)
    return json.dumps(data, separators=(",", ":"))


def write_json(data: Any, path: Path) -> None:
    """Write JSON compactly (large datasets) with a trailing newline: :func:`dumps_compact`'s text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_compact(data)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")


def prepare(
    tasks: Sequence[dict[str, Any]],
    summary: ExportSummary,
    *,
    label_config: str | LabelingSpec | None,
    annotations: str,
    include_predictions: bool,
    image_key: str | None,
    text_from: str | None = None,
    expression_key: str | None = None,
    resolver: ImageResolver,
    progress: bool,
) -> tuple[LabelingSpec | None, list[ImageRecord], list[str]]:
    """Parse the label config and read the tasks: ``(spec, records, categories)``."""
    spec = label_config if isinstance(label_config, LabelingSpec) else spec_from_config(label_config)
    records = read_tasks(
        tasks,
        summary=summary,
        spec=spec,
        annotations=annotations,
        include_predictions=include_predictions,
        image_key=image_key,
        text_from=text_from,
        expression_key=expression_key,
        resolver=resolver,
        progress=progress,
    )
    categories = categories_for(records, spec)
    summary.note(
        "categories in label-config order"
        if spec is not None
        else "categories sorted by name (no label config)"
    )
    return spec, records, categories


def read_and_place(
    tasks: Sequence[dict[str, Any]],
    summary: ExportSummary,
    resolver: ImageResolver | None,
    images_dir: Path,
    images: str,
    **read_options: Any,
) -> tuple[list[ImageRecord], list[str], dict[int, str]]:
    """:func:`prepare` (``read_options`` are its keywords) then :func:`place_images`, closing the
    resolver: ``(records whose image was placed, categories, {image_id: file_name})``."""
    resolver = resolver or ImageResolver()
    try:
        _, records, categories = prepare(tasks, summary, resolver=resolver, **read_options)
        records, names = place_images(
            records, resolver, images_dir, images, summary, progress=read_options["progress"]
        )
    finally:
        resolver.close()
    return records, categories, names


def finish(summary: ExportSummary, coco: dict[str, Any], out: Path) -> ExportSummary:
    """Count the dataset's images, annotations and categories and write the summary into ``out``."""
    for key in ("images", "annotations", "categories"):
        summary.count(key, len(coco[key]))
    summary.write(out)
    return summary


def without_gc(fn: Callable[..., ExportSummary]) -> Callable[..., ExportSummary]:
    """Run an export with the cyclic garbage collector paused: building millions of small lists and
    dicts next to the loaded export (which every full collection walks) otherwise spends a third of
    the time in collections that find nothing. Reference counting still frees everything; the
    collector runs again afterwards."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> ExportSummary:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return run


@without_gc
def export_coco(
    tasks: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    label_config: str | LabelingSpec | None = None,
    annotations: str = "latest",
    include_predictions: bool = False,
    images: str = "copy",
    resolver: ImageResolver | None = None,
    image_key: str | None = None,
    brush_format: str = "rle",
    polygon_tolerance: float = 0.0,
    progress: bool = False,
) -> ExportSummary:
    """Write ``<out_dir>/instances.json`` (COCO instances) and the images into ``<out_dir>/images``.

    ``tasks`` is Label Studio's JSON export (a list of tasks). Returns the summary (also written to
    ``<out_dir>/export_summary.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary("coco")
    records, categories, names = read_and_place(
        tasks,
        summary,
        resolver,
        out / "images",
        images,
        label_config=label_config,
        annotations=annotations,
        include_predictions=include_predictions,
        image_key=image_key,
        progress=progress,
    )
    coco, _ = build_coco(
        records, categories, names, summary, brush_format=brush_format, polygon_tolerance=polygon_tolerance
    )
    write_json(coco, out / "instances.json")
    return finish(summary, coco, out)


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
