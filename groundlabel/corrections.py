"""How much annotators changed groundlabel's regions: a task's prediction against its submitted annotation.

The measuring core of ``groundlabel report`` and of the backend's live quality metrics (numpy only: no
torch, no OpenCV, no pycocotools, so the backend can use it). Three steps, each usable alone:

1. **Regions as masks.** :func:`read_regions` reads the region results of a prediction or an annotation
   (``brushlabels``, ``polygonlabels``, ``rectanglelabels``, ``keypointlabels``, or the plain types with a
   ``labels`` result of the same id) into :class:`Region` objects; :func:`region_mask` rasterises one at
   the image size (brush RLE with :func:`groundlabel.ls_format.brush_rle_decode`, polygons and rectangles
   by COCO's rule, :func:`polygon_mask`, pixel for pixel what pycocotools' ``frPyObjects`` gives, so the
   report measures the masks that ``groundlabel export --format coco`` writes); :func:`label_masks` unions
   the brush and polygon regions per control and label.
2. **Pairs.** :func:`latest_annotation` is a task's latest submitted annotation (cancelled ones never
   count); :func:`started_from` the prediction it started from: the one its ``parent_prediction`` names
   (Label Studio sets it when an annotator starts from a prediction), else the task's latest prediction
   created no later than the annotation; None means the task was annotated without one.
3. **Measures.** :func:`compare` measures one prediction against one annotation; :func:`measure_task`
   pairs and compares a task (Label Studio's JSON export format). Per control and label over the task
   (:class:`LabelMeasure`): the mask IoU of the brush and polygon regions' union and its boundary F at
   :data:`BOUNDARY_TOLERANCE` pixels. Per region (:class:`RegionChange`): whether the annotator kept it as
   predicted, edited it, deleted it, or added it, matched by region id where Label Studio kept it, else
   by overlap (IoU >= :data:`MATCH_IOU` within the same control; key points within
   :data:`POINT_MATCH_FRACTION` of the image diagonal), with the box IoU of rectangles and the distance of
   key points. :func:`summarise` adds many tasks' measures up per model version, engine, control and label.

A region is *kept* when its match has the same labels and the same pixels (the same point for a key point),
*edited* otherwise (moved, reshaped, relabelled); a predicted region without a match is *deleted*, an
annotated one without a match *added*.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_decode, percent_to_pixels, rectangle_corners
from groundlabel.versions import engine_of

#: Result type -> region kind. The plain types take their labels from a ``labels`` result of the same id.
REGION_KINDS = {
    "brushlabels": "brush",
    "brush": "brush",
    "polygonlabels": "polygon",
    "polygon": "polygon",
    "rectanglelabels": "rectangle",
    "rectangle": "rectangle",
    "keypointlabels": "keypoint",
    "keypoint": "keypoint",
}
#: Region kinds measured as masks per control and label (mask IoU, boundary F).
MASK_KINDS = ("brush", "polygon")
#: Region kinds that cover pixels (matched by IoU; a rectangle is rasterised as its four corners' polygon).
AREA_KINDS = ("brush", "polygon", "rectangle")
#: The least IoU at which a predicted and an annotated region of one control are the same region.
MATCH_IOU = 0.5
#: Two key points of one control are the same point within this fraction of the image diagonal.
POINT_MATCH_FRACTION = 0.05
#: The boundary F measure's tolerance in pixels: a boundary pixel within this distance of the other
#: mask's boundary counts as a hit.
BOUNDARY_TOLERANCE = 2
#: What happened to a region: the keys of :attr:`RegionChange.change`.
CHANGES = ("kept", "edited", "deleted", "added")
#: The model version of tasks annotated without a prediction (in :func:`summarise`'s lead times).
NO_PREDICTION = "none"


# ---------------------------------------------------------------------------------------------------
# Regions


@dataclass(frozen=True)
class Region:
    """One region of a prediction or an annotation, as Label Studio wrote it."""

    id: str
    control: str  # from_name
    kind: str  # brush | polygon | rectangle | keypoint
    labels: tuple[str, ...]
    value: Mapping[str, Any]
    width: int | None = None  # original_width / original_height of the result, when given
    height: int | None = None

    @property
    def label(self) -> str:
        """The first label (a region with several is measured under its first), ``""`` without one."""
        return self.labels[0] if self.labels else ""


def _labels(result: Mapping[str, Any], by_id: Mapping[str, list[str]]) -> tuple[str, ...]:
    rtype = str(result.get("type") or "")
    value = result.get("value") or {}
    labels = value.get(rtype) if rtype.endswith("labels") and isinstance(value, Mapping) else None
    if not labels:
        labels = by_id.get(str(result.get("id")), [])
    if isinstance(labels, str):
        labels = [labels]
    return tuple(str(v) for v in labels) if isinstance(labels, list | tuple) else ()


def _size(result: Mapping[str, Any], key: str) -> int | None:
    raw = result.get(key)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
        return None
    return int(raw)


def read_regions(results: Any) -> list[Region]:
    """The regions of a prediction's or annotation's ``result`` list, in order (other results, such as
    TextArea texts and choices, are left out; so is anything that is not a dict)."""
    results = [r for r in results or [] if isinstance(r, Mapping)]
    by_id: dict[str, list[str]] = {}
    for res in results:
        if res.get("type") == "labels":
            value = res.get("value") or {}
            by_id.setdefault(str(res.get("id")), []).extend(str(v) for v in value.get("labels") or [])
    out = []
    for index, res in enumerate(results):
        kind = REGION_KINDS.get(str(res.get("type") or ""))
        value = res.get("value")
        if kind is None or not isinstance(value, Mapping):
            continue
        rid = res.get("id")
        out.append(
            Region(
                id=str(rid) if rid not in (None, "") else f"#{index}",
                control=str(res.get("from_name") or ""),
                kind=kind,
                labels=_labels(res, by_id),
                value=value,
                width=_size(res, "original_width"),
                height=_size(res, "original_height"),
            )
        )
    return out


def image_size(*result_lists: Any) -> tuple[int, int] | None:
    """``(width, height)`` of the image, from the first result that names its original size."""
    for results in result_lists:
        for res in results or []:
            if isinstance(res, Mapping):
                w, h = _size(res, "original_width"), _size(res, "original_height")
                if w and h:
                    return w, h
    return None


# ---------------------------------------------------------------------------------------------------
# Rasterising


def polygon_mask(points: Any, height: int, width: int) -> np.ndarray:
    """A boolean ``(height, width)`` mask of a polygon given in pixels (``[[x, y], ...]`` or a flat
    ``[x1, y1, ...]``), rasterised by COCO's rule: pixel for pixel what pycocotools'
    ``frPyObjects([flat], height, width)`` decodes to (its ``rleFrPoly``: the outline traced on a 5x grid,
    the crossings of pixel centre columns turned into run starts), written with numpy. Fewer than three
    points give an empty mask."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.zeros(height * width, dtype=np.bool_)
    if len(xy) < 3 or height <= 0 or width <= 0:
        return out.reshape(height, width)
    scale = 5.0
    # upsample: the vertices on a 5x grid, rounded as C's (int)(v + .5) does (towards zero)
    x = (scale * xy[:, 0] + 0.5).astype(np.int64)
    y = (scale * xy[:, 1] + 0.5).astype(np.int64)
    xs, ys = x, y
    xe, ye = np.append(x[1:], x[:1]), np.append(y[1:], y[:1])
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy
    flip = (along_x & (xs > xe)) | (~along_x & (ys > ye))
    xs, xe = np.where(flip, xe, xs), np.where(flip, xs, xe)
    ys, ye = np.where(flip, ye, ys), np.where(flip, ys, ye)
    span = np.where(along_x, dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(along_x, (ye - ys) / np.maximum(dx, 1), (xe - xs) / np.maximum(dy, 1))
    # every point along every edge, in the order C walks them
    count = span + 1
    edge = np.repeat(np.arange(len(xy)), count)
    d = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    t = np.where(flip[edge], span[edge] - d, d)
    ax = along_x[edge]
    offset = (np.where(ax, ys[edge], xs[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u = np.where(ax, t + xs[edge], offset)
    v = np.where(ax, offset, t + ys[edge])
    # where the traced outline crosses a pixel centre column: the first row inside below it
    step = np.flatnonzero(u[1:] != u[:-1]) + 1
    if step.size == 0:
        return out.reshape(height, width)
    xd = np.where(u[step] < u[step - 1], u[step], u[step] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.minimum(v[step], v[step - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, height))
    starts, times = np.unique(
        xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64), return_counts=True
    )
    # each start toggles inside/outside from there on (column-major), up to the end of the image; two at one
    # place cancel out
    bounds = starts[times % 2 == 1]
    if bounds.size % 2:
        bounds = np.append(bounds, height * width)
    begins, lengths = bounds[0::2], bounds[1::2] - bounds[0::2]
    out[np.arange(int(lengths.sum())) + np.repeat(begins - (np.cumsum(lengths) - lengths), lengths)] = True
    return out.reshape(width, height).T


def region_mask(region: Region, height: int, width: int) -> np.ndarray:
    """A brush, polygon or rectangle region as a boolean ``(height, width)`` mask.

    Raises :class:`UserError` for a region that cannot be rasterised (a brush mask of another size or
    with corrupt RLE, coordinates that are not numbers) and ``ValueError`` for a key point."""
    value = region.value
    try:
        if region.kind == "brush":
            rle = value.get("rle")
            if value.get("format", "rle") != "rle" or not isinstance(rle, list):
                raise UserError(f"brush region {region.id} has no 'rle' list")
            if (region.width or width, region.height or height) != (width, height):
                raise UserError(
                    f"brush region {region.id} is {region.width}x{region.height}, "
                    f"but the image is {width}x{height}"
                )
            return brush_rle_decode(rle, height, width)
        if region.kind == "polygon":
            return polygon_mask(percent_to_pixels(value.get("points") or [], width, height), height, width)
        if region.kind == "rectangle":
            return polygon_mask(rectangle_corners(value, width, height), height, width)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{region.kind} region {region.id} cannot be read: {exc}") from exc
    raise ValueError(f"a {region.kind} region has no mask")


def region_box(region: Region, width: int, height: int) -> tuple[float, float, float, float]:
    """A rectangle region's axis-aligned box ``(x0, y0, x1, y1)`` in pixels (around its rotated corners)."""
    corners = rectangle_corners(region.value, width, height)
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def region_point(region: Region, width: int, height: int) -> tuple[float, float]:
    """A key point region's position ``(x, y)`` in pixels."""
    ((x, y),) = percent_to_pixels([[float(region.value["x"]), float(region.value["y"])]], width, height)
    return float(x), float(y)


def label_masks(regions: Iterable[Region], height: int, width: int) -> dict[tuple[str, str], np.ndarray]:
    """The union of the brush and polygon regions per ``(control, label)``, as boolean masks."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for region in regions:
        if region.kind in MASK_KINDS:
            key = (region.control, region.label)
            mask = region_mask(region, height, width)
            out[key] = out[key] | mask if key in out else mask
    return out


# ---------------------------------------------------------------------------------------------------
# Measures of two masks, two boxes


#: A mask's bounding box: rows ``y0:y1`` and columns ``x0:x1`` (end-exclusive); None for an empty mask.
Box = tuple[int, int, int, int]


def mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box ``(y0, y1, x0, x1)`` of a boolean mask's pixels, None when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _window(
    shape: tuple[int, ...], boxes: Iterable[Box | None], margin: int = 0
) -> tuple[slice, slice] | None:
    """The rows and columns around ``boxes``, widened by ``margin`` within ``shape`` (None: no box)."""
    found = [b for b in boxes if b is not None]
    if not found:
        return None
    h, w = shape[:2]
    return (
        slice(max(min(b[0] for b in found) - margin, 0), min(max(b[1] for b in found) + margin, h)),
        slice(max(min(b[2] for b in found) - margin, 0), min(max(b[3] for b in found) + margin, w)),
    )


def mask_iou(
    a: np.ndarray, b: np.ndarray, *, boxes: tuple[Box | None, Box | None] | None = None
) -> float | None:
    """Intersection over union of two boolean masks of one size; None when both are empty. ``boxes``: their
    :func:`mask_box` when known (only the pixels around them are read)."""
    window = _window(a.shape, boxes if boxes is not None else (mask_box(a), mask_box(b)))
    if window is None:
        return None
    a, b = a[window], b[window]
    return float(np.count_nonzero(a & b) / np.count_nonzero(a | b))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (outside the array counts as outside)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0] = inner[-1] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a disc of ``radius`` pixels (Euclidean): each row offset ``dy`` adds the mask grown
    along its rows by ``isqrt(radius**2 - dy**2)``, shifted by ``dy``."""
    h, w = mask.shape
    along = [mask]  # along[k]: grown by k pixels to the left and right
    for k in range(1, radius + 1):
        grown = along[-1].copy()
        grown[:, k:] |= mask[:, :-k]
        grown[:, :-k] |= mask[:, k:]
        along.append(grown)
    out = along[radius].copy()
    for dy in range(1, radius + 1):
        row = along[math.isqrt(radius * radius - dy * dy)]
        out[dy:] |= row[:-dy]
        out[:-dy] |= row[dy:]
    return out


def boundary_f(
    a: np.ndarray,
    b: np.ndarray,
    tolerance: int = BOUNDARY_TOLERANCE,
    *,
    boxes: tuple[Box | None, Box | None] | None = None,
) -> float | None:
    """The boundary F measure of two masks: precision is the share of ``a``'s boundary pixels within
    ``tolerance`` pixels of ``b``'s boundary, recall the share of ``b``'s within ``tolerance`` of ``a``'s,
    F their harmonic mean (0 when either mask is empty and the other not; None when both are). ``boxes``:
    their :func:`mask_box` when known."""
    window = _window(a.shape, boxes if boxes is not None else (mask_box(a), mask_box(b)), tolerance + 1)
    if window is None:
        return None
    ba, bb = _boundary(a[window]), _boundary(b[window])
    na, nb = np.count_nonzero(ba), np.count_nonzero(bb)
    if not na or not nb:
        return 0.0
    precision = np.count_nonzero(ba & _dilate(bb, tolerance)) / na
    recall = np.count_nonzero(bb & _dilate(ba, tolerance)) / nb
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x0, y0, x1, y1)`` (continuous coordinates)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Pairs


def _time(item: Mapping[str, Any], *keys: str) -> datetime | None:
    for key in keys:
        raw = item.get(key)
        if isinstance(raw, str) and raw:
            try:
                stamp = datetime.fromisoformat(raw)
            except ValueError:
                continue
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.now().astimezone().tzinfo)
    return None


def _order(item: Mapping[str, Any], *keys: str) -> tuple[float, int]:
    stamp = _time(item, *keys)
    ident = item.get("id")
    return (stamp.timestamp() if stamp else float("-inf"), ident if isinstance(ident, int) else -1)


def latest_annotation(task: Mapping[str, Any]) -> dict[str, Any] | None:
    """The task's latest submitted annotation (by ``updated_at``, else ``created_at``, then id); cancelled
    (skipped) annotations never count. None without one."""
    usable = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(usable, key=lambda a: _order(a, "updated_at", "created_at")) if usable else None


def started_from(task: Mapping[str, Any], annotation: Mapping[str, Any]) -> dict[str, Any] | None:
    """The prediction ``annotation`` started from: the one its ``parent_prediction`` names, else the task's
    latest prediction created no later than the annotation (any, when the times are not known); None when
    the task has none (it was annotated without one). Predictions listed by id only are not read."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    parent = annotation.get("parent_prediction")
    if isinstance(parent, Mapping):  # an expanded prediction
        parent = parent.get("id")
    if isinstance(parent, int) and not isinstance(parent, bool):
        for p in predictions:
            if p.get("id") == parent:
                return p
    made = _time(annotation, "created_at")
    earlier = [
        p for p in predictions if made is None or (stamp := _time(p, "created_at")) is None or stamp <= made
    ]
    return max(earlier, key=lambda p: _order(p, "created_at")) if earlier else None


# ---------------------------------------------------------------------------------------------------
# Measures of a pair


@dataclass
class LabelMeasure:
    """The brush and polygon regions of one control and label over a task: prediction vs annotation."""

    control: str
    label: str
    iou: float  # mask IoU of the unions (0 when only one side has the label)
    boundary_f: float  # boundary F at BOUNDARY_TOLERANCE pixels
    unchanged: bool = False  # every region of the label kept as predicted (its pixels were not read)


@dataclass
class RegionChange:
    """What the annotator did to one region: ``change`` is kept, edited, deleted or added."""

    control: str
    label: str  # the annotated region's label (the predicted one's when deleted)
    kind: str
    change: str
    matched_by: str | None = None  # "id" or "overlap"; None for deleted and added regions
    predicted_id: str | None = None
    annotated_id: str | None = None
    iou: float | None = None  # area kinds: the IoU of the pair's masks (rectangles: of their boxes)
    distance: float | None = None  # key points: pixels between the pair
    predicted_label: str | None = None


@dataclass
class TaskMeasures:
    """One task's latest submitted annotation against the prediction it started from."""

    task: Any
    annotation: Any
    prediction: Any = None  # the prediction's id; None when annotated without one
    model_version: str | None = None
    engine: str | None = None
    lead_time: float | None = None
    width: int | None = None
    height: int | None = None
    labels: list[LabelMeasure] = field(default_factory=list)
    regions: list[RegionChange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # regions that could not be read, and why

    @property
    def from_prediction(self) -> bool:
        """Whether the annotation started from a prediction."""
        return self.model_version is not None

    def counts(self) -> dict[str, int]:
        """How many regions were kept, edited, deleted and added."""
        out = dict.fromkeys(CHANGES, 0)
        for r in self.regions:
            out[r.change] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class _Geometry:
    """What a region is measured on: its mask and the mask's box (area kinds), its box in pixels
    (rectangles), its point (key points)."""

    mask: np.ndarray | None = None
    box: Box | None = None
    rectangle: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None


def _geometry(region: Region, width: int, height: int) -> _Geometry:
    if region.kind == "keypoint":
        return _Geometry(point=region_point(region, width, height))
    mask = region_mask(region, height, width)
    rectangle = region_box(region, width, height) if region.kind == "rectangle" else None
    return _Geometry(mask=mask, box=mask_box(mask), rectangle=rectangle)


def _union(geometry: list[_Geometry]) -> _Geometry:
    """The union of some regions' masks, with its box."""
    found = [g for g in geometry if g.box is not None]
    if not found:
        return _Geometry(mask=geometry[0].mask if geometry else None)
    mask = found[0].mask
    for g in found[1:]:
        mask = mask | g.mask
    window = _window(mask.shape, (g.box for g in found))
    return _Geometry(mask=mask, box=(window[0].start, window[0].stop, window[1].start, window[1].stop))


def _same_pixels(a: _Geometry, b: _Geometry) -> bool:
    if a.box != b.box:
        return False
    window = _window(a.mask.shape, (a.box,))
    return window is None or bool(np.array_equal(a.mask[window], b.mask[window]))


class _Side:
    """The regions of a prediction or an annotation, their geometry made when first asked for."""

    def __init__(self, results: Any, width: int, height: int, errors: list[str]) -> None:
        self.regions = read_regions(results)
        self.width, self.height = width, height
        self.errors = errors
        self.geometry: dict[int, _Geometry | None] = {}

    def geo(self, i: int) -> _Geometry | None:
        """Region ``i``'s geometry; None (and an error) when it cannot be read."""
        if i not in self.geometry:
            try:
                self.geometry[i] = _geometry(self.regions[i], self.width, self.height)
            except (UserError, KeyError, TypeError, ValueError) as exc:
                self.errors.append(str(exc))
                self.geometry[i] = None
        return self.geometry[i]


def compare(
    predicted: Any,
    annotated: Any,
    width: int,
    height: int,
    *,
    match_iou: float = MATCH_IOU,
    point_fraction: float = POINT_MATCH_FRACTION,
    tolerance: int = BOUNDARY_TOLERANCE,
) -> tuple[list[LabelMeasure], list[RegionChange], list[str]]:
    """Measure an annotation's results against a prediction's (both Label Studio ``result`` lists) on a
    ``width`` x ``height`` image: ``(label measures, region changes, errors)``.

    A region the annotator kept as Label Studio wrote it (same id, same value) is kept without being read;
    its pixels are read only when another region of its label changed. A region that cannot be read is named
    in the errors and left out of the measures that needed it."""
    errors: list[str] = []
    pred, ann = _Side(predicted, width, height, errors), _Side(annotated, width, height, errors)

    # pairs by region id; those left as they were share their geometry
    pairs: dict[int, tuple[int, str]] = {}  # predicted index -> (annotated index, how)
    unchanged: set[int] = set()  # predicted indexes whose annotated region is the same value
    by_id = {(r.control, r.id): j for j, r in enumerate(ann.regions)}
    for i, r in enumerate(pred.regions):
        j = by_id.pop((r.control, r.id), None)
        if j is not None and ann.regions[j].kind == r.kind:
            pairs[i] = (j, "id")
            if ann.regions[j].value == r.value and ann.regions[j].labels == r.labels:
                unchanged.add(i)
    shared = {pairs[i][0]: i for i in unchanged}

    def ann_geo(j: int) -> _Geometry | None:
        return pred.geo(shared[j]) if j in shared else ann.geo(j)

    # the other regions: by overlap within each control
    taken = {j for j, _ in pairs.values()}
    limit = point_fraction * math.hypot(width, height)
    candidates = []
    for i, r in enumerate(pred.regions):
        if i in pairs:
            continue
        for j, s in enumerate(ann.regions):
            if j in taken or s.control != r.control or s.kind != r.kind:
                continue
            a, b = pred.geo(i), ann.geo(j)
            if a is None or b is None:
                continue
            if r.kind == "keypoint":
                dist = math.dist(a.point, b.point)
                if dist <= limit:
                    candidates.append((-dist, i, j))
            else:
                iou = mask_iou(a.mask, b.mask, boxes=(a.box, b.box)) or 0.0
                if iou >= match_iou:
                    candidates.append((iou, i, j))
    for _, i, j in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if i not in pairs and j not in taken:
            pairs[i] = (j, "overlap")
            taken.add(j)

    # what happened to each region
    regions = []
    for i, (j, how) in sorted(pairs.items()):
        r, s = pred.regions[i], ann.regions[j]
        change = RegionChange(s.control, s.label, s.kind, "edited", how, r.id, s.id, predicted_label=r.label)
        if i in unchanged:
            change.change = "kept"
            if r.kind == "keypoint":
                change.distance = 0.0
            else:
                change.iou = 1.0
            regions.append(change)
            continue
        a, b = pred.geo(i), ann.geo(j)
        if a is None or b is None:
            continue
        if r.kind == "keypoint":
            change.distance = math.dist(a.point, b.point)
            same = change.distance < 0.5
        else:
            if r.kind == "rectangle":
                change.iou = box_iou(a.rectangle, b.rectangle)
            else:
                iou = mask_iou(a.mask, b.mask, boxes=(a.box, b.box))
                change.iou = 1.0 if iou is None else iou
            same = _same_pixels(a, b)
        if same and r.labels == s.labels:
            change.change = "kept"
        regions.append(change)
    for i, r in enumerate(pred.regions):
        if i not in pairs and (r.kind == "keypoint" or pred.geo(i) is not None):
            regions.append(RegionChange(r.control, r.label, r.kind, "deleted", predicted_id=r.id))
    for j, s in enumerate(ann.regions):
        if j not in taken and (s.kind == "keypoint" or ann.geo(j) is not None):
            regions.append(RegionChange(s.control, s.label, s.kind, "added", annotated_id=s.id))

    # per control and label: the union of the brush and polygon regions on each side
    keys: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for side, items in ((0, pred.regions), (1, ann.regions)):
        for n, r in enumerate(items):
            if r.kind in MASK_KINDS:
                keys.setdefault((r.control, r.label), ([], []))[side].append(n)
    labels = []
    for key in sorted(keys):
        mine, theirs = keys[key]
        if all(i in unchanged for i in mine) and sorted(pairs[i][0] for i in mine) == sorted(theirs):
            labels.append(LabelMeasure(key[0], key[1], 1.0, 1.0, unchanged=True))
            continue
        a = _union(
            [g for i in mine if (g := pred.geo(i)) is not None] or [_Geometry(mask=_empty(height, width))]
        )
        b = _union(
            [g for j in theirs if (g := ann_geo(j)) is not None] or [_Geometry(mask=_empty(height, width))]
        )
        if a.box is None and b.box is None:  # the label's regions cover no pixel on either side
            continue
        boxes = (a.box, b.box)
        same = _same_pixels(a, b)
        iou = 1.0 if same else mask_iou(a.mask, b.mask, boxes=boxes)
        bf = 1.0 if same else boundary_f(a.mask, b.mask, tolerance, boxes=boxes)
        labels.append(LabelMeasure(key[0], key[1], float(iou), float(bf or 0.0)))
    return labels, regions, errors


def _empty(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width), dtype=bool)


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    return float(raw)


def measure_annotation(
    annotation: Mapping[str, Any],
    prediction: Mapping[str, Any] | None,
    *,
    task: Any = None,
    size: tuple[int, int] | None = None,
    **options: Any,
) -> TaskMeasures:
    """Measure one annotation against the prediction it started from (None: annotated without one).
    ``size`` is ``(width, height)`` when the results do not name it. ``options`` go to :func:`compare`."""
    annotated = annotation.get("result") or []
    predicted = (prediction or {}).get("result") or []
    out = TaskMeasures(
        task=task if task is not None else annotation.get("task"), annotation=annotation.get("id")
    )
    out.lead_time = _number(annotation.get("lead_time"))
    if prediction is not None:
        out.prediction = prediction.get("id")
        out.model_version = str(prediction.get("model_version") or "unknown")
        out.engine = engine_of(out.model_version)
    found = image_size(annotated, predicted) or size
    if found is None:
        if read_regions(annotated) or read_regions(predicted):
            out.errors.append("the image size is unknown: no result names original_width/original_height")
        return out
    out.width, out.height = found
    if prediction is not None:
        out.labels, out.regions, out.errors = compare(predicted, annotated, found[0], found[1], **options)
    return out


def measure_task(task: Mapping[str, Any], **options: Any) -> TaskMeasures | None:
    """Pair a task (Label Studio's JSON export format) and measure it: None when it has no submitted
    annotation. ``options`` go to :func:`compare`."""
    annotation = latest_annotation(task)
    if annotation is None:
        return None
    return measure_annotation(annotation, started_from(task, annotation), task=task.get("id"), **options)


# ---------------------------------------------------------------------------------------------------
# Adding up


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


@dataclass
class Group:
    """The measures of many tasks for one model version, engine, control and label."""

    model_version: str
    engine: str
    control: str
    label: str
    kinds: set[str] = field(default_factory=set)  # the region kinds seen (brush, polygon, ...)
    ious: list[float] = field(default_factory=list)  # one per task where the label was predicted or annotated
    boundary_fs: list[float] = field(default_factory=list)
    box_ious: list[float] = field(default_factory=list)  # matched rectangles
    distances: list[float] = field(default_factory=list)  # matched key points
    changes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANGES, 0))

    def row(self) -> dict[str, Any]:
        """A JSON-ready summary: means, medians, counts and rates (``kept``, ``edited`` and ``deleted`` of
        the predicted regions, ``added`` of the annotated ones)."""
        c = self.changes
        predicted = c["kept"] + c["edited"] + c["deleted"]
        annotated = c["kept"] + c["edited"] + c["added"]
        return {
            "model_version": self.model_version,
            "engine": self.engine,
            "control": self.control,
            "label": self.label,
            "kind": "+".join(sorted(self.kinds)),
            "tasks": len(self.ious),
            "mask_iou_mean": _mean(self.ious),
            "mask_iou_median": _median(self.ious),
            "boundary_f_mean": _mean(self.boundary_fs),
            "box_iou_mean": _mean(self.box_ious),
            "point_distance_mean": _mean(self.distances),
            "predicted_regions": predicted,
            "annotated_regions": annotated,
            **c,
            "kept_rate": _rate(c["kept"], predicted),
            "edited_rate": _rate(c["edited"], predicted),
            "deleted_rate": _rate(c["deleted"], predicted),
            "added_rate": _rate(c["added"], annotated),
        }


def summarise(measures: Iterable[TaskMeasures]) -> dict[str, Any]:
    """Many tasks' measures added up: ``{"groups": [Group.row(), ...], "versions": [...], "totals": {...}}``.

    ``groups`` are per model version, engine, control and label (tasks annotated from a prediction only);
    ``versions`` per model version: tasks, lead time (mean and median seconds), mean mask IoU and the
    changes, with a :data:`NO_PREDICTION` entry for tasks annotated without a prediction (their lead time
    is the baseline a pre-label should beat). ``ious`` in each group is kept for distributions."""
    groups: dict[tuple[str, str, str, str], Group] = {}
    versions: dict[str, dict[str, Any]] = {}
    errors = 0
    tasks = 0
    for m in measures:
        tasks += 1
        errors += len(m.errors)
        version = m.model_version or NO_PREDICTION
        v = versions.setdefault(
            version,
            {"model_version": version, "engine": m.engine or "", "lead_times": [], "tasks": 0, "ious": []},
        )
        v["tasks"] += 1
        if m.lead_time is not None:
            v["lead_times"].append(m.lead_time)
        if not m.from_prediction:
            continue

        engine = m.engine or ""

        def group(control: str, label: str, version: str = version, engine: str = engine) -> Group:
            key = (version, engine, control, label)
            if key not in groups:
                groups[key] = Group(version, engine, control, label)
            return groups[key]

        for lm in m.labels:
            g = group(lm.control, lm.label)
            g.ious.append(lm.iou)
            g.boundary_fs.append(lm.boundary_f)
            v["ious"].append(lm.iou)
        for rc in m.regions:
            g = group(rc.control, rc.label)
            g.kinds.add(rc.kind)
            g.changes[rc.change] += 1
            if rc.kind == "rectangle" and rc.iou is not None:
                g.box_ious.append(rc.iou)
            if rc.kind == "keypoint" and rc.distance is not None:
                g.distances.append(rc.distance)
    rows = []
    for key in sorted(groups):
        g = groups[key]
        row = g.row()
        row["ious"] = g.ious
        rows.append(row)
    version_rows = []
    for name in sorted(versions, key=lambda n: (n == NO_PREDICTION, n)):
        v = versions[name]
        changes = dict.fromkeys(CHANGES, 0)
        for row in rows:
            if row["model_version"] == name:
                for c in CHANGES:
                    changes[c] += row[c]
        predicted = changes["kept"] + changes["edited"] + changes["deleted"]
        version_rows.append(
            {
                "model_version": name,
                "engine": v["engine"],
                "tasks": v["tasks"],
                "lead_time_mean": _mean(v["lead_times"]),
                "lead_time_median": _median(v["lead_times"]),
                "mask_iou_mean": _mean(v["ious"]),
                **changes,
                "kept_rate": _rate(changes["kept"], predicted),
            }
        )
    return {"groups": rows, "versions": version_rows, "totals": {"tasks": tasks, "errors": errors}}
