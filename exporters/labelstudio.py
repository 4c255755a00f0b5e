"""Reading Label Studio exports: the task list, which annotation wins, regions and expressions.

The input is Label Studio's full "JSON" export (a list of tasks with ``data``, ``annotations`` and
``predictions``), read from a file (:func:`load_labelstudio_export`) or from a project through the API
(:func:`fetch_project`). :func:`read_tasks` turns it into :class:`ImageRecord` objects that every
format writer shares: one per exported annotation, holding the image reference and size, the regions
in pixels (with COCO RLE, area and bbox) and the referring expressions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_decode
from groundlabel.spec import LabelingSpec, parse_label_config

from . import geometry
from .images import ImageNotFound, ImageResolver
from .summary import ExportSummary

ANNOTATION_MODES = ("latest", "ground-truth", "all")

#: result type -> region kind; the plain types get their label from a ``labels`` result with the same id.
REGION_KINDS = {
    "polygonlabels": "polygon",
    "polygon": "polygon",
    "brushlabels": "brush",
    "brush": "brush",
    "rectanglelabels": "rectangle",
    "rectangle": "rectangle",
}
#: Region types that are not instances (no area): reported, not exported.
POINT_TYPES = ("keypointlabels", "keypoint")
#: Results that carry no region and no expression; reported as "result is not a region".
NON_REGION_TYPES = ("choices", "rating", "number", "taxonomy", "relation", "datetime", "pairwise", "ranker")


@dataclass
class Region:
    """One labelled region in pixels, with its COCO measures."""

    region_id: str
    label: str
    kind: str  # polygon | brush | rectangle
    from_name: str
    to_name: str
    rle: dict[str, Any]  # pycocotools RLE of the region's mask
    area: int
    bbox: list[float]
    polygons: list[list[float]] | None = None  # pixel polygons (polygon, rectangle)
    score: float | None = None


@dataclass
class ImageRecord:
    """One exported annotation (or prediction) of one task."""

    task_id: int | None
    image_id: int
    image_ref: str
    width: int
    height: int
    origin: str  # "annotation N" | "prediction N"
    regions: list[Region] = field(default_factory=list)
    region_texts: dict[str, list[str]] = field(default_factory=dict)  # region id -> sentences
    task_texts: list[str] = field(default_factory=list)  # expressions for the whole task
    #: texts read but not taken as expressions: (TextArea name, where, lines); the ref writers report them
    unused_texts: list[tuple[str, str, list[str]]] = field(default_factory=list)
    skipped_regions: int = 0  # region results of this annotation that could not be exported


def load_labelstudio_export(path: str | Path) -> list[dict[str, Any]]:
    """Read a Label Studio "JSON" export file: a list of tasks (a single task object is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    try:
        data = _parse_json(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "the file may be truncated: export it again"
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: {exc}") from exc
    return validate_tasks(data, str(path))


def _parse_json(raw: bytes) -> Any:
    """JSON text to Python objects: orjson (twice as fast on exports full of brush RLE numbers), and the
    standard parser for what orjson refuses (NaN, huge integers) and for its error messages."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson comes with the export extra
        orjson = None
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw.decode("utf-8"))


def validate_tasks(data: Any, source: str = "the export") -> list[dict[str, Any]]:
    """Check that ``data`` is Label Studio's full JSON export and return its task list."""
    if isinstance(data, dict) and "data" in data:
        data = [data]
    if not isinstance(data, list):
        raise UserError(
            f"{source} must be a JSON list of tasks (Label Studio's JSON export), got {type(data).__name__}"
        )
    for i, task in enumerate(data):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UserError(f"{source}: item {i} is not a task with a 'data' object")
    if data and not any("annotations" in t or "predictions" in t for t in data):
        raise UserError(
            f"{source} has no 'annotations' in any task: it looks like a JSON_MIN or CSV-style export; "
            "export the project as 'JSON' instead"
        )
    return data


def fetch_project(
    project: int, *, url: str, api_key: str, client: Any = None
) -> tuple[list[dict[str, Any]], str, Any]:
    """``(tasks, label_config, client)`` of a Label Studio project read through its API.

    The client is :func:`groundlabel.ls_client.make_client`'s (a legacy token or a personal access token);
    a failed call raises :class:`~groundlabel.ls_client.LabelStudioError` with the reason, never the key.
    """
    if not url or not api_key:
        raise UserError("--project needs --url and --api-key (or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    from groundlabel.ls_client import api_call, get_project, make_client

    client = client or make_client(url, api_key)
    info = get_project(client, project)

    def download() -> bytes:
        chunks = client.projects.exports.download_sync(project, export_type="JSON", download_all_tasks=True)
        return b"".join(chunks)

    raw = api_call(f"exporting project {project}", download)
    try:
        tasks = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"project {project}: Label Studio's export is not valid JSON: {exc}") from exc
    return validate_tasks(tasks, f"project {project}"), info.label_config or "", client


def _listed_ids(task: dict[str, Any]) -> list[int]:
    return [p for p in task.get("predictions") or [] if isinstance(p, int) and not isinstance(p, bool)]


def has_prediction_ids(tasks: Sequence[dict[str, Any]]) -> bool:
    """Whether some task lists its predictions by id only, as Label Studio 1.23's JSON export does."""
    return any(_listed_ids(t) for t in tasks)


def fill_predictions(tasks: Sequence[dict[str, Any]], client: Any, project: int | None = None) -> int:
    """Replace predictions listed by id with the predictions themselves, read through the API (one
    request per project, or per task when a task does not name its project); the number filled in."""
    from groundlabel.ls_client import list_predictions

    listed = [t for t in tasks if _listed_ids(t)]
    by_id: dict[int, dict[str, Any]] = {}
    projects = {project} if project is not None else {t.get("project") for t in listed}
    for pid in sorted(p for p in projects if isinstance(p, int)):
        by_id.update({int(p["id"]): p for p in list_predictions(client, project_id=pid)})
    filled = 0
    for task in listed:
        if any(i not in by_id for i in _listed_ids(task)) and isinstance(task.get("id"), int):
            by_id.update({int(p["id"]): p for p in list_predictions(client, task_id=task["id"])})
        items = []
        for item in task["predictions"]:
            if isinstance(item, int) and item in by_id:
                items.append(by_id[item])
                filled += 1
            else:
                items.append(item)
        task["predictions"] = items
    return filled


def spec_from_config(label_config: str | None) -> LabelingSpec | None:
    """Parse a label config (XML text) when one is given."""
    return parse_label_config(label_config) if label_config and label_config.strip() else None


def config_categories(spec: LabelingSpec) -> list[str]:
    """Category names in label-config order (every control's labels, first occurrence wins)."""
    names: dict[str, None] = {}
    for control in spec.controls:
        if control.type in ("PolygonLabels", "BrushLabels", "RectangleLabels"):
            for label in control.labels:
                names.setdefault(label, None)
    return list(names)


def categories_for(records: Iterable[ImageRecord], spec: LabelingSpec | None) -> list[str]:
    """Category names: the label config's order when there is one, otherwise the labels seen, by name."""
    if spec is not None:
        return config_categories(spec)
    return sorted({r.label for rec in records for r in rec.regions})


# ---------------------------------------------------------------------------------------------------
# Which annotation


def _when(item: dict[str, Any]) -> tuple[str, int]:
    stamp = item.get("updated_at") or item.get("created_at") or ""
    ident = item.get("id")
    return str(stamp), ident if isinstance(ident, int) else -1


def select_sources(
    task: dict[str, Any], mode: str, include_predictions: bool, summary: ExportSummary, where: str
) -> list[tuple[str, dict[str, Any]]]:
    """The annotations (and predictions) of ``task`` to export, as ``(origin, item)`` pairs.

    ``latest``: the most recently updated annotation; ``ground-truth``: the annotations marked
    ``ground_truth`` (a task without one is skipped); ``all``: every annotation. Cancelled (skipped)
    annotations never count. With ``include_predictions``, predictions are used when the task has no
    usable annotation (the latest one; all of them with ``all``).
    """
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    usable = []
    for ann in annotations:
        if ann.get("was_cancelled"):
            summary.skip("cancelled annotation", f"{where} annotation {ann.get('id')}")
        else:
            usable.append(ann)
    chosen: list[dict[str, Any]]
    if mode == "all":
        chosen = usable
    elif mode == "ground-truth":
        chosen = [a for a in usable if a.get("ground_truth")]
        if usable and not chosen:
            summary.skip(
                "no ground-truth annotation", where, f"{len(usable)} annotation(s), none ground truth"
            )
            return []
    else:
        chosen = [max(usable, key=_when)] if usable else []
    picked = [(f"annotation {a.get('id')}", a) for a in chosen]
    if include_predictions and (mode == "all" or not usable):
        if _listed_ids(task):
            summary.skip(
                "prediction listed by id only",
                where,
                "the JSON export lists predictions by id: read the project with --project, or give "
                "--url and --api-key (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) to fetch them",
            )
        predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
        if mode != "all" and predictions:
            predictions = [max(predictions, key=_when)]
        picked += [(f"prediction {p.get('id')}", p) for p in predictions]
    if not picked:
        summary.skip("task without annotation", where)
    return picked


# ---------------------------------------------------------------------------------------------------
# Reading results


def _image_ref(task: dict[str, Any], image_key: str | None, where: str) -> str:
    data = task["data"]
    if image_key:
        ref = data.get(image_key)
        if not isinstance(ref, str) or not ref:
            raise ImageNotFound(f"task data has no image under {image_key!r}")
        return ref
    if isinstance(data.get("image"), str) and data["image"]:
        return data["image"]
    strings = [v for v in data.values() if isinstance(v, str) and v]
    if len(strings) == 1:
        return strings[0]
    raise ImageNotFound(
        f"cannot tell which data field holds the image ({', '.join(sorted(data)) or 'no fields'}): "
        "pass --image-key or --label-config"
    )


def _texts(value: dict[str, Any]) -> list[str]:
    raw = value.get("text")
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    lines = []
    for item in items:
        if isinstance(item, str):
            lines.extend(line.strip() for line in item.splitlines() if line.strip())
    return lines


def _labels_of(result: dict[str, Any], labels_by_id: dict[str, list[str]]) -> list[str]:
    value = result.get("value") or {}
    labels = value.get(result.get("type", "")) if result.get("type", "").endswith("labels") else None
    if not labels:
        labels = labels_by_id.get(str(result.get("id")), [])
    return [str(v) for v in labels] if isinstance(labels, list) else [str(labels)]


class _Reader:
    """Turns the results of one annotation into regions and expressions."""

    def __init__(
        self,
        spec: LabelingSpec | None,
        summary: ExportSummary,
        text_from: str | None,
    ) -> None:
        self.spec = spec
        self.summary = summary
        self.controls = {c.name: c for c in spec.controls} if spec else {}
        self.only_text_from = text_from  # --text-from: this TextArea's texts alone
        self.task_text_from = spec.text_name if spec else None  # per-task expressions: the config's TextArea
        self.config_labels = set(config_categories(spec)) if spec else None

    def region(
        self, result: dict[str, Any], kind: str, label: str, width: int, height: int, where: str
    ) -> Region | None:
        value = result.get("value") or {}
        rid = str(result.get("id") or "")
        polygons = None
        try:
            if kind == "polygon":
                poly = geometry.polygon_from_percent(value.get("points") or [], width, height)
                polygons = [poly]
                rle = geometry.rle_from_polygons(polygons, width, height)
                area, bbox = geometry.measure(rle)
            elif kind == "rectangle":
                bbox, poly = geometry.rectangle_from_percent(value, width, height)
                polygons = [poly]
                rle = geometry.rle_from_polygons(polygons, width, height)
                area, _ = geometry.measure(rle)
            else:
                if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
                    raise geometry.GeometryError("unreadable brush mask", "brush value has no 'rle' list")
                bw = int(result.get("original_width") or width)
                bh = int(result.get("original_height") or height)
                if (bw, bh) != (width, height):
                    raise geometry.GeometryError(
                        "brush RLE size mismatch", f"mask is {bw}x{bh} but the image is {width}x{height}"
                    )
                try:
                    mask = brush_rle_decode(value["rle"], height, width)
                except UserError as exc:
                    raise geometry.GeometryError("brush RLE size mismatch", str(exc)) from exc
                rle = geometry.rle_from_mask(mask)
                area, bbox = geometry.measure(rle)
        except geometry.GeometryError as exc:
            self.summary.skip(exc.reason, f"{where} region {rid}", exc.detail)
            return None
        if area <= 0:
            self.summary.skip("empty mask", f"{where} region {rid}", f"{kind} covers no pixel")
            return None
        score = result.get("score")
        return Region(
            region_id=rid,
            label=label,
            kind=kind,
            from_name=str(result.get("from_name") or ""),
            to_name=str(result.get("to_name") or ""),
            rle=rle,
            area=area,
            bbox=bbox,
            polygons=polygons,
            score=float(score) if isinstance(score, (int, float)) else None,
        )

    def read(self, record: ImageRecord, results: Sequence[Any], where: str) -> None:
        """Fill ``record`` with the regions and expressions of one annotation's results."""
        results = [r for r in results if isinstance(r, dict)]
        labels_by_id: dict[str, list[str]] = {}
        for res in results:
            if res.get("type") == "labels":
                labels_by_id.setdefault(str(res.get("id")), []).extend(
                    str(v) for v in (res.get("value") or {}).get("labels") or []
                )
        texts: list[dict[str, Any]] = []
        for res in results:
            rtype = str(res.get("type") or "")
            rid = str(res.get("id") or "")
            here = f"{where} region {rid}" if rid else where
            from_name = str(res.get("from_name") or "")
            if rtype == "textarea":
                texts.append(res)
                continue
            if rtype == "labels":
                continue
            if rtype in POINT_TYPES:
                self.summary.skip("keypoint region (not an instance)", here)
                record.skipped_regions += 1
                continue
            if rtype in NON_REGION_TYPES:
                self.summary.skip("result is not a region", here, rtype)
                continue
            kind = REGION_KINDS.get(rtype)
            if kind is None:
                self.summary.skip("unknown region type", here, repr(rtype))
                record.skipped_regions += 1
                continue
            if self.spec is not None:
                control = self.controls.get(from_name)
                if control is None:
                    self.summary.skip("control not in the label config", here, repr(from_name))
                    record.skipped_regions += 1
                    continue
                if REGION_KINDS.get(control.result_type) != kind:
                    self.summary.skip(
                        "region type does not match its control",
                        here,
                        f"{rtype} from {control.type} {from_name!r}",
                    )
                    record.skipped_regions += 1
                    continue
            labels = _labels_of(res, labels_by_id)
            if not labels:
                self.summary.skip("region without label", here)
                record.skipped_regions += 1
                continue
            label = labels[0]
            if len(labels) > 1:
                self.summary.note("regions with several labels are exported under their first label")
            if self.config_labels is not None and label not in self.config_labels:
                self.summary.skip("label not in the label config", here, repr(label))
                record.skipped_regions += 1
                continue
            region = self.region(res, kind, label, record.width, record.height, where)
            if region is None:
                record.skipped_regions += 1
            else:
                record.regions.append(region)
        region_ids = {str(r.get("id")) for r in results if str(r.get("type") or "") not in ("textarea",)}
        for res in texts:
            self._text(record, res, region_ids, where)

    def _text(self, record: ImageRecord, res: dict[str, Any], region_ids: set[str], where: str) -> None:
        """One TextArea result: a region's expression (per-region text, from any TextArea unless
        ``--text-from`` names one), the task's (the config's TextArea, or ``--text-from``'s), or unused."""
        lines = _texts(res.get("value") or {})
        if not lines:
            return
        name = str(res.get("from_name") or "")
        rid = str(res.get("id") or "")
        per_region = bool(rid) and rid in region_ids
        wanted = self.only_text_from or (None if per_region else self.task_text_from)
        if wanted is not None and name != wanted:
            here = f"{where} region {rid}" if per_region else where
            record.unused_texts.append((name, here, lines))
        elif per_region:
            record.region_texts.setdefault(rid, []).extend(lines)
        else:
            record.task_texts.extend(lines)


def _size_from_results(results: Sequence[Any]) -> tuple[int, int] | None:
    for res in results:
        if isinstance(res, dict) and res.get("original_width") and res.get("original_height"):
            try:
                return int(res["original_width"]), int(res["original_height"])
            except (TypeError, ValueError):
                continue
    return None


def read_tasks(
    tasks: Sequence[dict[str, Any]],
    *,
    summary: ExportSummary,
    spec: LabelingSpec | None = None,
    annotations: str = "latest",
    include_predictions: bool = False,
    image_key: str | None = None,
    text_from: str | None = None,
    expression_key: str | None = None,
    resolver: ImageResolver | None = None,
    progress: bool = False,
) -> list[ImageRecord]:
    """Read every task's chosen annotation(s) into :class:`ImageRecord` objects, reporting skips."""
    if annotations not in ANNOTATION_MODES:
        raise UserError(f"--annotations must be one of {', '.join(ANNOTATION_MODES)}, got {annotations!r}")
    from tqdm import tqdm

    resolver = resolver or ImageResolver()
    reader = _Reader(spec, summary, text_from)
    image_key = image_key or (spec.image_key if spec else None)
    expression_key = expression_key or (spec.text_key if spec else None)
    ids = [t.get("id") for t in tasks]
    use_task_ids = all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(set(ids)) == len(
        ids
    )
    if not use_task_ids and tasks:
        summary.note("tasks lack unique integer ids: image ids are positions in the export (1-based)")
    records: list[ImageRecord] = []
    sizes: dict[str, tuple[int, int]] = {}
    for index, task in enumerate(tqdm(tasks, desc="reading tasks", unit="task", disable=not progress)):
        task_id = task.get("id") if use_task_ids else None
        image_id = task_id if use_task_ids else index + 1
        where = f"task {task.get('id', index + 1)}"
        summary.count("tasks read")
        sources = select_sources(task, annotations, include_predictions, summary, where)
        if not sources:
            continue
        try:
            ref = _image_ref(task, image_key, where)
        except ImageNotFound as exc:
            summary.skip("image not found", where, str(exc))
            continue
        for origin, item in sources:
            results = item.get("result") or []
            if not isinstance(results, list):
                summary.skip("unreadable annotation", f"{where} {origin}", "'result' is not a list")
                continue
            size = _size_from_results(results) or sizes.get(ref)
            if size is None:
                try:
                    size = resolver.size(ref)
                except ImageNotFound as exc:
                    summary.skip(
                        "image size unknown", f"{where} {origin}", f"no original_width/height and {exc}"
                    )
                    continue
            sizes[ref] = size
            record = ImageRecord(task_id, image_id, ref, size[0], size[1], origin)
            reader.read(record, results, f"{where} {origin}")
            if not record.task_texts and expression_key:
                expr = task["data"].get(expression_key)
                if isinstance(expr, str) and expr.strip():
                    record.task_texts = [line.strip() for line in expr.splitlines() if line.strip()]
            records.append(record)
    return records
