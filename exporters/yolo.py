"""Ultralytics YOLO datasets from Label Studio annotations: boxes (``yolo``) or polygons (``yolo-seg``).

The layout Ultralytics reads (its dataset guides for detection and instance segmentation)::

    <out>/data.yaml                       train: images/train, val: images/val, names: {0: ..., 1: ...}
    <out>/images/{train,val}/<file>       the images (copied, linked, or left out with images="none")
    <out>/labels/{train,val}/<stem>.txt   one row per instance, coordinates normalised to [0, 1]

Ultralytics finds an image's labels by replacing the last ``/images/`` of its path with ``/labels/`` and
its suffix with ``.txt``, so image file names are made unique without their suffix. Rows:

- ``yolo``: ``<class> <x_center> <y_center> <width> <height>``, the region's COCO ``bbox`` (a rectangle's
  drawn box, else the box of the region's mask);
- ``yolo-seg``: ``<class> <x1> <y1> ... <xn> <yn>``, the region's outline: a polygon's points, a
  rectangle's 4 corners, a brush mask traced as RefCOCO traces it. A region of several parts is one
  outline through all of them, each part entered and left along a zero-width bridge between its closest
  vertex and the previous part's (as Ultralytics' own COCO converter joins the parts of an instance).

Classes are 0-based, in the COCO categories' order (the label config's, else the labels sorted by name).
``data.yaml`` has no ``path``: Ultralytics then takes the folder holding it as the dataset root, so the
dataset can be moved. Images are split by image as RefCOCO splits them (a seeded hash of the image
reference: an image keeps its split when the project grows) into train and val, 0.8/0.2 by default.
Every exported image has a label file, empty when none of its regions was exported; tasks showing the same
image share its label file, where a row repeating another is left out (Ultralytics drops it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from groundlabel.jit import compiled

from .coco import build_coco
from .registry import ExportOptions, export_options
from .steps import finish, read_and_place, splitter, without_gc
from .summary import ExportSummary

#: The splits of a YOLO dataset and their default fractions.
SPLITS = ("train", "val")
DEFAULT_FRACTIONS = (0.8, 0.2)
#: The image suffixes Ultralytics lists in an images folder; other files are not read.
IMAGE_SUFFIXES = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"})


def label_name(file_name: str) -> str:
    """The label file of an image file: its name with ``.txt`` instead of its suffix."""
    return f"{file_name.rsplit('.', 1)[0]}.txt"


def _stem(file_name: str) -> str:
    return file_name.rsplit(".", 1)[0]


def _numbers(values: np.ndarray) -> str:
    """Normalised coordinates clipped to [0, 1] (no ``-0``), 6 decimals, separated by spaces."""
    clipped = (np.clip(values, 0.0, 1.0) + 0.0).tolist()
    return ("%.6f " * len(clipped) % tuple(clipped))[:-1]


def box_row(bbox: Sequence[float], width: int, height: int) -> str:
    """``x_center y_center width height`` of a pixel ``[x, y, w, h]`` box clipped to the image (the reader
    has skipped regions with no pixel in it), normalised."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    centre_size = [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
    return _numbers(np.array(centre_size))


def polygon_row(polygons: Sequence[Sequence[float]], width: int, height: int) -> str:
    """``x1 y1 ... xn yn`` of a COCO polygon segmentation (pixels), its parts joined into one outline
    (:func:`join_parts`), normalised and clipped to [0, 1]."""
    flat = polygons[0] if len(polygons) == 1 else join_parts(polygons)
    points = np.asarray(flat, dtype=np.float64).reshape(-1, 2) / (width, height)
    return _numbers(points.reshape(-1))


def join_parts(parts: Sequence[Sequence[float]]) -> list[float]:
    """One closed outline through every part of a flat-polygon list: from the first part's first vertex
    round each part once; on the way, at the vertex closest to the next part, cross to that part's
    closest vertex, go round it (and the parts after it) and come back along the same line. The bridges
    have no width, so the outline covers what the parts cover."""
    rings = [np.ascontiguousarray(p, dtype=np.float64).reshape(-1, 2) for p in parts]
    links = [_closest(a, b) for a, b in zip(rings, rings[1:], strict=False)]
    entries = [0] + [b for _, b in links]
    path = _closed(rings[-1], entries[-1])
    for i in range(len(rings) - 2, -1, -1):
        ring = _closed(rings[i], entries[i])
        k = (links[i][0] - entries[i]) % len(rings[i])  # the exit vertex's place on the rolled ring
        path = np.concatenate([ring[: k + 1], path, ring[k:]])
    return path.reshape(-1).tolist()


def _closed(ring: np.ndarray, start: int) -> np.ndarray:
    rolled = np.roll(ring, -start, axis=0)
    return np.concatenate([rolled, rolled[:1]])


@compiled
def _closest(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices of the closest pair of vertices, one of ``a`` and one of ``b`` (``[n, 2]`` float64), the
    first such pair in ``a``'s order then ``b``'s."""
    best = np.inf
    pair = (0, 0)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            dx = a[i, 0] - b[j, 0]
            dy = a[i, 1] - b[j, 1]
            d = dx * dx + dy * dy
            if d < best:
                best = d
                pair = (i, j)
    return pair


def yaml_string(text: str) -> str:
    """``text`` as a YAML double-quoted scalar: quotes, backslashes, control characters and the
    characters YAML reads as line breaks or byte-order marks escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif code in (0x2028, 0x2029, 0xFEFF, 0xFFFE, 0xFFFF) or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def data_yaml(categories: Sequence[str], task: str) -> str:
    """``data.yaml``: the two splits' image folders (relative to the file's folder) and the class names."""
    names = "".join(f"  {i}: {yaml_string(name)}\n" for i, name in enumerate(categories))
    return (
        f"# Ultralytics YOLO {task} dataset exported by groundlabel; the dataset root is this file's folder\n"
        f"train: images/{SPLITS[0]}\nval: images/{SPLITS[1]}\n"
        f"nc: {len(categories)}\n" + (f"names:\n{names}" if names else "names: {}\n")
    )


def _export(
    tasks: Sequence[dict[str, Any]], out_dir: str | Path, options: ExportOptions, *, segments: bool
) -> ExportSummary:
    fmt = "yolo-seg" if segments else "yolo"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(fmt)
    fractions = DEFAULT_FRACTIONS if options.fractions is None else options.fractions
    split = splitter(SPLITS, fractions, options.seed, scheme="yolo")
    records, categories, names = read_and_place(
        tasks, summary, options, lambda rec: out / "images" / split(rec.image_ref), unique=_stem
    )
    coco, _ = build_coco(
        records,
        categories,
        names,
        summary,
        brush_format="polygon" if segments else "rle",  # boxes of brush masks: their exact mask's
        polygon_tolerance=options.polygon_tolerance,
        description=f"{fmt} exported by groundlabel",
    )
    # One label file per image file: tasks showing the same image share it (and its split).
    files: dict[tuple[str, str], dict[str, None]] = {}  # (split, label file) -> its rows, in order
    file_of: dict[int, tuple[str, str]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for img in coco["images"]:
        file_of[img["id"]] = (split(img["labelstudio"]["image"]), label_name(img["file_name"]))
        files.setdefault(file_of[img["id"]], {})
        sizes[img["id"]] = (img["width"], img["height"])
    for ann in coco["annotations"]:
        width, height = sizes[ann["image_id"]]
        if segments:
            row = polygon_row(ann["segmentation"], width, height)
        else:
            row = box_row(ann["bbox"], width, height)
        meta = ann["labelstudio"]
        where = f"task {meta['task_id'] or ann['image_id']} {meta['origin']} region {meta['region_id']}"
        rows = files[file_of[ann["image_id"]]]
        line = f"{ann['category_id'] - 1} {row}\n"
        if line in rows:
            summary.skip("duplicate row", where, "the same class and coordinates as another region's")
        else:
            rows[line] = None
    for name in SPLITS:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "labels" / name).mkdir(parents=True, exist_ok=True)
    per_split: dict[str, dict[str, int]] = {}
    for (where, label), rows in files.items():
        (out / "labels" / where / label).write_text("".join(rows), encoding="utf-8")
        counts = per_split.setdefault(where, {"images": 0, "annotations": 0})
        counts["images"] += 1
        counts["annotations"] += len(rows)
    unlisted = {n for n in names.values() if n.rsplit(".", 1)[-1].lower() not in IMAGE_SUFFIXES}
    if unlisted:
        summary.note(
            f"{len(unlisted)} image file name(s) without an image suffix Ultralytics lists "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): it does not read those images"
        )
    (out / "data.yaml").write_text(data_yaml(categories, "segmentation" if segments else "detection"))
    summary.splits = {s: per_split[s] for s in SPLITS if s in per_split}
    exported = sum(len(rows) for rows in files.values())
    return finish(summary, out, images=len(files), annotations=exported, categories=len(categories))


@without_gc
def export_yolo(
    tasks: Sequence[dict[str, Any]], out_dir: str | Path, options: ExportOptions | None = None, **changes: Any
) -> ExportSummary:
    """Write an Ultralytics YOLO detection dataset into ``out_dir``: ``data.yaml``, ``images/{train,val}/``
    and ``labels/{train,val}/*.txt`` with one normalised box per region. ``options`` and ``changes``
    (:class:`~exporters.registry.ExportOptions` fields; ``fractions`` are train and val) say what to export.
    """
    return _export(tasks, out_dir, export_options(options, changes), segments=False)


@without_gc
def export_yolo_seg(
    tasks: Sequence[dict[str, Any]], out_dir: str | Path, options: ExportOptions | None = None, **changes: Any
) -> ExportSummary:
    """Write an Ultralytics YOLO segmentation dataset: as :func:`export_yolo`, with one normalised outline
    polygon per region (brush masks traced, parts joined)."""
    return _export(tasks, out_dir, export_options(options, changes), segments=True)
