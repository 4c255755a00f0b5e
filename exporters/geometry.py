"""Label Studio regions to COCO geometry: pixel polygons, COCO RLE, area and bbox.

Percent coordinates are converted with :mod:`groundlabel.ls_format`; masks are measured with
pycocotools (``area``, ``toBbox``) so the numbers match what COCO tools compute from the same
segmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from groundlabel.jit import compiled
from groundlabel.ls_format import percent_to_pixels, rectangle_corners


class GeometryError(ValueError):
    """A region whose shape cannot become a COCO instance; ``reason`` is the summary category."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def polygon_from_percent(points: Any, width: int, height: int) -> list[float]:
    """A Label Studio polygon (``[[x%, y%], ...]``) as a flat COCO pixel polygon ``[x1, y1, ...]``.

    Raises :class:`GeometryError` for fewer than 3 distinct points or a zero-area outline.
    """
    try:
        pts = percent_to_pixels(points, width, height)
    except (TypeError, ValueError) as exc:
        raise GeometryError("degenerate polygon", f"points are not [[x, y], ...] numbers: {exc}") from exc
    if not np.isfinite(pts).all():
        raise GeometryError("degenerate polygon", "points are not finite numbers")
    distinct = len({(x, y) for x, y in np.round(pts, 6).tolist()})  # few points: a set beats np.unique
    if distinct < 3:
        raise GeometryError("degenerate polygon", f"{distinct} distinct point(s), a polygon needs 3")
    x, y = pts[:, 0], pts[:, 1]
    twice = float(x[1:] @ y[:-1] - y[1:] @ x[:-1]) + float(x[0] * y[-1] - y[0] * x[-1])
    if 0.5 * abs(twice) <= 1e-9:
        raise GeometryError("degenerate polygon", "the points enclose zero area")
    return [round(v, 3) for v in pts.reshape(-1).tolist()]


def rectangle_from_percent(value: dict[str, Any], width: int, height: int) -> tuple[list[float], list[float]]:
    """A Label Studio rectangle as ``(bbox [x, y, w, h], 4-point polygon)`` in pixels.

    Label Studio rotates a rectangle by ``rotation`` degrees (clockwise on screen) around its
    top-left corner ``(x, y)``; the polygon's corners follow that rotation and start at ``(x, y)``.
    The bbox is the axis-aligned box around the corners.
    """
    try:
        x = float(value["x"]) * width / 100.0
        y = float(value["y"]) * height / 100.0
        w = float(value["width"]) * width / 100.0
        h = float(value["height"]) * height / 100.0
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError) as exc:
        raise GeometryError(
            "degenerate polygon", f"rectangle needs numeric x, y, width, height: {exc}"
        ) from exc
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)):
        raise GeometryError("degenerate polygon", "rectangle coordinates are not finite")
    if w <= 0 or h <= 0:
        raise GeometryError("degenerate polygon", f"rectangle of size {w:.3g}x{h:.3g} pixels has no area")
    pts = rectangle_corners(value, width, height).tolist()
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return [round(v, 3) for v in bbox], [round(v, 3) for p in pts for v in p]


def rle_from_polygons(polygons: Sequence[Sequence[float]], width: int, height: int) -> dict[str, Any]:
    """One COCO RLE (compressed) for the union of pixel polygons, rasterised by pycocotools."""
    rles = mask_utils.frPyObjects([list(p) for p in polygons], height, width)
    return mask_utils.merge(rles) if len(rles) > 1 else rles[0]


#: Eight pixels of a 0/1 byte mask read as one word: all outside, all inside.
_WORD_OUT = np.uint64(0)
_WORD_IN = np.uint64(0x0101010101010101)


@compiled
def _coco_rle_string(flat: np.ndarray, words: np.ndarray, starts: np.ndarray, out: np.ndarray) -> int:
    """Write COCO's compressed RLE string of a column-major 0/1 byte mask ``flat`` into ``out`` and
    return its length, or -1 when ``starts`` (room for the runs' start positions) or ``out`` is too
    small. ``words`` holds the first ``8 * len(words)`` bytes of ``flat`` as uint64, so that runs of 8
    equal pixels are skipped a word at a time. Byte for byte what pycocotools' ``encode`` gives
    (``rleEncode`` then ``rleToString``: each count minus the count two before it, in 5-bit groups
    with a continuation bit, plus 48)."""
    n = flat.size
    room = starts.size - 1
    m = 0  # runs found after the first one (which starts at 0, with a zero count if flat[0] is 1)
    prev = 0
    fill = _WORD_OUT
    for wi in range(words.size):
        if words[wi] == fill:
            continue
        for i in range(wi * 8, wi * 8 + 8):
            if flat[i] != prev:
                if m >= room:
                    return -1
                starts[m] = i
                m += 1
                prev = 1 - prev
        fill = _WORD_IN if prev else _WORD_OUT
    for i in range(words.size * 8, n):
        if flat[i] != prev:
            if m >= room:
                return -1
            starts[m] = i
            m += 1
            prev = 1 - prev
    starts[m] = n
    size = out.size
    p = 0
    before = 0  # the count two before the current one
    last = 0
    begin = 0
    for k in range(m + 1):
        count = starts[k] - begin
        begin = starts[k]
        x = count - before if k > 2 else count
        more = True
        while more:
            if p >= size:
                return -1
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out[p] = c + 48
            p += 1
        before = last
        last = count
    return p


def rle_from_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean ``(H, W)`` mask (nonzero is inside) as COCO compressed RLE, identical to pycocotools'
    ``encode``; a column-major boolean mask (what :func:`groundlabel.ls_format.brush_rle_decode`
    returns) is read without a copy."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    m = np.asfortranarray(mask if mask.dtype == np.bool_ else mask != 0)
    flat = m.reshape(-1, order="F").view(np.uint8)
    words = flat[: flat.size // 8 * 8].view(np.uint64)
    starts, out = np.empty(8192, np.int64), np.empty(65536, np.uint8)
    length = _coco_rle_string(flat, words, starts, out)
    if length < 0:  # many runs: room for the worst case (a run per pixel)
        starts, out = np.empty(flat.size + 1, np.int64), np.empty(7 * (flat.size + 1), np.uint8)
        length = _coco_rle_string(flat, words, starts, out)
    counts = out[:length].tobytes()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def measure(rle: dict[str, Any]) -> tuple[int, list[float]]:
    """``(area, bbox)`` of an RLE, computed by pycocotools."""
    return int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def rle_to_json(rle: dict[str, Any]) -> dict[str, Any]:
    """A pycocotools RLE with ``counts`` as text, ready for ``json.dump``."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _outline_polygons(up: np.ndarray, x0: int, y0: int, tolerance: float) -> list[list[float]]:
    """The outer outlines of ``up`` (a mask's bounding box from ``(x0, y0)``, upsampled 2x, C-order
    uint8) as flat pixel polygons: what :func:`mask_to_polygons` and :func:`rle_to_polygons` return."""
    import cv2

    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(2 * x0, 2 * y0))
    polygons: list[list[float]] = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance * 2.0, True)
        pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0
        if len(pts) < 3:
            continue
        polygons.append(np.round(pts, 2).reshape(-1).tolist())
    return polygons


def mask_to_polygons(mask: np.ndarray, *, tolerance: float = 0.0) -> list[list[float]]:
    """Outer outlines of a boolean mask as flat COCO pixel polygons.

    The outlines run along pixel edges (traced on a 2x nearest-neighbour upsampling), so rasterising
    them with pycocotools gives back the mask (holes are filled: COCO polygons cannot hold holes).
    ``tolerance`` > 0 simplifies the outlines (Douglas-Peucker, in pixels). Parts that end up with
    fewer than 3 points are dropped. :func:`rle_to_polygons` gives the same from a COCO RLE, faster.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])  # trace only the mask's bounding box
    crop = m[y0 : int(rows[-1]) + 1, x0 : int(cols[-1]) + 1]
    up = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    return _outline_polygons(up, x0, y0, tolerance)


@compiled
def _fill_upsampled(counts: np.ndarray, height: int, x0: int, y0: int, up: np.ndarray) -> None:
    """Paint the inside pixels of a COCO compressed RLE string ``counts`` (a column-major mask of
    ``height`` rows) into ``up``, the 2x nearest-neighbour upsampling of the box from ``(x0, y0)``;
    pixels outside the box are left out. The string is read as pycocotools' ``rleFrString`` reads it
    (5-bit groups with a continuation bit, plus 48; each count after the second is relative to the
    count two before it)."""
    rows, cols = up.shape[0] // 2, up.shape[1] // 2
    p = 0
    m = 0
    pos = 0
    inside = False
    before = 0  # the count two before the current one
    last = 0
    n = counts.size
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            c = np.int64(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = (c & 0x20) != 0
            p += 1
            k += 1
            if not more and (c & 0x10) != 0:
                x |= np.int64(-1) << (5 * k)
        if m > 2:
            x += before
        before = last
        last = x
        m += 1
        if inside and x > 0:
            col = pos // height
            row = pos - col * height
            left = x
            while left > 0:
                seg = min(height - row, left)
                cx = col - x0
                if 0 <= cx < cols:
                    r0 = max(row - y0, 0)
                    r1 = min(row + seg - y0, rows)
                    for r in range(r0, r1):
                        up[2 * r, 2 * cx] = 1
                        up[2 * r, 2 * cx + 1] = 1
                        up[2 * r + 1, 2 * cx] = 1
                        up[2 * r + 1, 2 * cx + 1] = 1
                left -= seg
                col += 1
                row = 0
        pos += x
        inside = not inside


def rle_to_polygons(rle: dict[str, Any], *, tolerance: float = 0.0) -> list[list[float]]:
    """:func:`mask_to_polygons` of a COCO compressed RLE (``counts`` as bytes or text), the same
    polygons: the RLE is painted straight into the upsampled bounding box by a compiled loop instead
    of being decoded into a full mask, copied to row-major order, cropped and upsampled."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    rle = {"size": rle["size"], "counts": counts}
    if int(mask_utils.area(rle)) <= 0:
        return []
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    up = np.zeros((2 * h, 2 * w), np.uint8)
    _fill_upsampled(np.frombuffer(counts, dtype=np.uint8), int(rle["size"][0]), x, y, up)
    return _outline_polygons(up, x, y, tolerance)


def decode_segmentation(segmentation: Any, width: int, height: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a boolean mask."""
    if isinstance(segmentation, list):
        rle = rle_from_polygons(segmentation, width, height)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise GeometryError(
            "unknown segmentation", f"cannot read a segmentation of type {type(segmentation)}"
        )
    return mask_utils.decode(rle).astype(bool)
