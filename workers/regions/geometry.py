"""Mask geometry: connected components, pixel-edge outlines, simplification, holes.

Coordinate convention (used by every region type and by :func:`polygon_to_mask`): pixel ``(row, col)``
covers the square ``[col, col+1) × [row, row+1)`` of the continuous image plane, so its centre is
``(col + 0.5, row + 0.5)`` and the whole image spans ``[0, width] × [0, height]``. Label Studio's
percent coordinates are this plane scaled by ``100 / width`` and ``100 / height``. A polygon covers a
pixel when the pixel's centre lies inside it (even-odd rule).

Outlines are first traced along the pixel edges (the "crack" boundary), so a single pixel gives a 1×1
square and a one-pixel-wide line keeps its area: ``cv2.findContours`` runs on the mask upsampled ×2
(nearest) and each traced sub-pixel centre is snapped to its nearest pixel corner. Simplified polygons
start from the ring through the midpoints of those pixel edges (what marching squares gives at level
0.5): it separates inside from outside pixel centres by at least 0.35 pixel and follows the shape
without the staircase, so Douglas-Peucker removes far more vertices for the same error.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from groundlabel.jit import compiled

#: The simplification tolerance is capped at this fraction of a region's "thickness" (area / perimeter,
#: holes included), which bounds the relative area error whatever tolerance the user sets.
THICKNESS_FRACTION = 0.1
#: A simplified ring whose area moved by more than this fraction is simplified again, less.
MAX_AREA_CHANGE = 0.02
#: Tolerances below this (pixels) keep the ring as it is (only collinear vertices are removed).
MIN_TOLERANCE = 0.05


@dataclass
class Components:
    """The 8-connected components of a mask that survived the minimum-area filter.

    ``labels`` covers a window of the image (the mask's bounding box): its pixel ``(r, c)`` is the
    image's ``(y0 + r, x0 + c)``; ``boxes`` are in image pixels. ``shape`` is the image's ``(H, W)``.
    """

    labels: np.ndarray  # int32 [h, w] of the window: component id per pixel, 0 = background
    ids: np.ndarray  # ids of the kept components, largest first
    boxes: np.ndarray  # [len(ids), 4] x, y, w, h in image pixels
    areas: np.ndarray  # [len(ids)] pixel counts
    scores: np.ndarray  # [len(ids)] mean score inside each component (1.0 without a score map)
    x0: int = 0
    y0: int = 0
    shape: tuple[int, int] | None = None  # the image's (H, W); None: the window is the image
    found: int | None = None  # components found before the area filter (None: unknown)

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image the components lie in."""
        h, w = self.labels.shape
        return self.shape if self.shape is not None else (int(h), int(w))

    def mask(self, k: int) -> tuple[np.ndarray, int, int]:
        """The k-th kept component as a cropped uint8 mask and the crop's (x, y) offset in the image."""
        x, y, w, h = (int(v) for v in self.boxes[k])
        rx, ry = x - self.x0, y - self.y0
        crop = (self.labels[ry : ry + h, rx : rx + w] == self.ids[k]).view(np.uint8)
        return crop, x, y

    def kept_window(self) -> np.ndarray:
        """All kept components as one boolean mask of the window."""
        if len(self) == 0:
            return np.zeros(self.labels.shape, dtype=bool)
        if self.found == len(self):  # every component was kept
            return self.labels > 0
        keep = np.zeros(int(self.labels.max()) + 1, dtype=bool)
        keep[self.ids] = True
        return keep.take(self.labels)

    def in_image(self, window: np.ndarray) -> np.ndarray:
        """A boolean mask of the window placed in an image-sized mask."""
        if self.shape is None:
            return window
        out = np.zeros(self.shape, dtype=bool)
        out[self.y0 : self.y0 + window.shape[0], self.x0 : self.x0 + window.shape[1]] = window
        return out

    def kept_mask(self) -> np.ndarray:
        """All kept components as one boolean mask of the image."""
        return self.in_image(self.kept_window())


def find_components(
    mask: np.ndarray,
    score_map: np.ndarray | None,
    min_area: float,
    *,
    offset: tuple[int, int] = (0, 0),
    shape: tuple[int, int] | None = None,
) -> Components:
    """Label the 8-connected components of ``mask``; drop those smaller than ``min_area`` pixels.

    ``mask`` (and ``score_map``, same shape) may be a window of a larger image: ``offset`` is the
    window's ``(x, y)`` in the image and ``shape`` the image's ``(H, W)``; the work grows with the window.
    """
    mask = np.ascontiguousarray(mask)
    m = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8, ltype=cv2.CV_32S)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    ids = np.arange(1, n, dtype=np.int64)
    keep = areas >= max(min_area, 1)
    ids, areas = ids[keep], areas[keep]
    order = np.argsort(-areas, kind="stable")
    ids, areas = ids[order], areas[order]
    boxes = stats[ids, :4].astype(np.int64) if ids.size else np.zeros((0, 4), dtype=np.int64)
    x0, y0 = (int(v) for v in offset)
    if ids.size:
        boxes[:, 0] += x0
        boxes[:, 1] += y0
    if score_map is not None and ids.size:
        scores = component_sums(labels, np.asarray(score_map, dtype=np.float32), n)[ids] / areas
    else:
        scores = np.ones(ids.size, dtype=np.float64)
    return Components(labels, ids, boxes, areas, scores, x0, y0, shape, n - 1)


@compiled
def component_sums(labels: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Per component id (``0..n-1``) the float64 sum of ``scores`` over its pixels, in pixel order (the
    same sums as ``np.bincount(labels, weights=scores)``, without its float64 copy of the scores)."""
    out = np.zeros(n, np.float64)
    for r in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            out[labels[r, c]] += scores[r, c]
    return out


@compiled
def masked_peak(mask: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[row, col, ties]``: the first pixel (raster order) of ``mask`` with the highest score, and how
    many pixels of ``mask`` share that score (``[-1, -1, 0]`` for an empty mask)."""
    best = -np.inf
    row = -1
    col = -1
    ties = 0
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            if mask[r, c]:
                v = scores[r, c]
                if row < 0 or v > best:
                    best = v
                    row = r
                    col = c
                    ties = 1
                elif v == best:
                    ties += 1
    out = np.empty(3, np.int64)
    out[0] = row
    out[1] = col
    out[2] = ties
    return out


def mask_window(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (end-exclusive) of a mask's nonzero pixels, None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@compiled
def update_best(score: np.ndarray, best: np.ndarray, index: np.ndarray, label: int) -> None:
    """One prompt's map into the running best score and best label (flat float32 / int32 arrays):
    where ``score`` beats ``best`` (strictly, so ties stay with the earlier label) it becomes the best
    and ``label`` the index. NaN and -inf count as 0, +inf as 1."""
    for p in range(score.size):
        v = score[p]
        if v != v or v == -np.inf:
            v = 0.0
        elif v == np.inf:
            v = 1.0
        if v > best[p]:
            best[p] = v
            index[p] = label


@compiled
def label_windows(best: np.ndarray, index: np.ndarray, threshold: np.float32, labels: int) -> np.ndarray:
    """One pass over ``best``/``index`` (``[H, W]``): index set to -1 where ``best`` is below ``threshold``
    (background), and per label the window ``[x0, y0, x1, y1, pixels]`` of its pixels (end-exclusive)."""
    width = index.shape[1]
    out = np.zeros((labels, 5), np.int64)
    for i in range(labels):
        out[i, 0] = width
        out[i, 1] = index.shape[0]
    for r in range(index.shape[0]):
        for c in range(width):
            if best[r, c] >= threshold:
                i = index[r, c]
                if c < out[i, 0]:
                    out[i, 0] = c
                if c + 1 > out[i, 2]:
                    out[i, 2] = c + 1
                if r < out[i, 1]:
                    out[i, 1] = r
                out[i, 3] = r + 1
                out[i, 4] += 1
            else:
                index[r, c] = -1
    return out


def _next(a: np.ndarray) -> np.ndarray:
    """``np.roll(a, -1, axis=0)``: each vertex's successor on a closed ring."""
    return np.concatenate((a[1:], a[:1]))


def _prev(a: np.ndarray) -> np.ndarray:
    """``np.roll(a, 1, axis=0)``: each vertex's predecessor on a closed ring."""
    return np.concatenate((a[-1:], a[:-1]))


def ring_area(ring: np.ndarray) -> float:
    """Signed area of a closed ring ``(N, 2)`` (shoelace; positive = clockwise on screen)."""
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, _next(y)) - np.dot(_next(x), y))


def ring_perimeter(ring: np.ndarray) -> float:
    """Perimeter of a closed ring."""
    if len(ring) < 2:
        return 0.0
    return float(np.linalg.norm(_next(ring) - ring, axis=1).sum())


def clean_ring(points: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed ring (lossless)."""
    if len(points) == 0:
        return points
    keep = np.any(points != _prev(points), axis=1)
    pts = points[keep] if keep.any() else points[:1]
    if len(pts) < 3:
        return pts
    prev, nxt = _prev(pts), _next(pts)
    d1, d2 = pts - prev, nxt - pts
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    dot = d1[:, 0] * d2[:, 0] + d1[:, 1] * d2[:, 1]
    turn = (cross != 0) | (dot <= 0)
    return pts[turn] if turn.sum() >= 3 else pts


def mask_rings(crop: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Exact pixel-edge outlines of a uint8 mask: ``[(outer, [holes...]), ...]``, one per component.

    Rings are float64 ``(N, 2)`` arrays of (x, y) pixel-corner coordinates relative to the crop, one
    vertex per unit step along the pixel edges; outer rings are oriented with positive
    :func:`ring_area`, holes with negative.
    """
    up = cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    up = cv2.copyMakeBorder(up, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    rings: list[np.ndarray] = []
    for c in contours:
        sub = c.reshape(-1, 2).astype(np.float64) - 1.0  # undo the border
        corners = np.rint((sub + 0.5) / 2.0)
        keep = np.any(corners != _prev(corners), axis=1)
        rings.append(corners[keep] if keep.any() else corners[:1])
    out: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        outer = rings[i]
        if ring_area(outer) < 0:
            outer = outer[::-1]
        holes: list[np.ndarray] = []
        j = child
        while j != -1:
            hole = rings[j]
            if ring_area(hole) > 0:
                hole = hole[::-1]
            holes.append(hole)
            j = hierarchy[j][0]
        out.append((outer, holes))
    return out


def midpoint_ring(ring: np.ndarray) -> np.ndarray:
    """The ring through the midpoints of a unit-step pixel-edge ring's edges (same orientation)."""
    return (ring + _next(ring)) / 2.0


def region_tolerance(rings: list[np.ndarray], tolerance: float) -> float:
    """``tolerance`` capped at :data:`THICKNESS_FRACTION` of the region's area / perimeter."""
    area = abs(sum(ring_area(r) for r in rings))
    perimeter = sum(ring_perimeter(r) for r in rings)
    if perimeter <= 0:
        return 0.0
    return min(float(tolerance), THICKNESS_FRACTION * area / perimeter)


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (``cv2.approxPolyDP``) that never degenerates a ring.

    The tolerance is halved until the simplified ring keeps at least 3 vertices and its area within
    :data:`MAX_AREA_CHANGE`; below :data:`MIN_TOLERANCE` only collinear vertices are removed.
    """
    ring = clean_ring(ring)
    if tolerance < MIN_TOLERANCE or len(ring) <= 4:
        return ring
    area = abs(ring_area(ring))
    if area <= 0:
        return ring
    eps = float(tolerance)
    pts = ring.astype(np.float32).reshape(-1, 1, 2)
    while eps >= MIN_TOLERANCE:
        simple = cv2.approxPolyDP(pts, eps, True).reshape(-1, 2).astype(np.float64)
        if len(simple) >= 3 and abs(abs(ring_area(simple)) - area) <= MAX_AREA_CHANGE * area:
            if np.sign(ring_area(simple)) != np.sign(ring_area(ring)):
                simple = simple[::-1]
            return simple
        eps /= 2.0
    return ring


def bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """One ring without holes: each hole joined to the ring by a zero-width cut (there and back).

    The cut is the shortest segment between a vertex of the ring built so far and a vertex of the hole.
    Because the cut is travelled once each way, it adds nothing under the even-odd or non-zero rule.
    """
    ring = outer
    for hole in sorted(holes, key=lambda h: -abs(ring_area(h))):
        if len(hole) < 3:
            continue
        i, j = _closest_pair(ring, hole)
        ring = np.concatenate([ring[: i + 1], hole[j:], hole[: j + 1], ring[i:]], axis=0)
    return ring


def _closest_pair(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> tuple[int, int]:
    best = (np.inf, 0, 0)
    for start in range(0, len(a), chunk):
        block = a[start : start + chunk]
        d = ((block[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
        k = int(np.argmin(d))
        i, j = divmod(k, d.shape[1])
        if d[i, j] < best[0]:
            best = (float(d[i, j]), start + i, j)
    return best[1], best[2]


def polygon_to_mask(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Rasterise one polygon given in PIXEL coordinates: pixels whose centre is inside (even-odd).

    Label Studio percent points convert with :func:`groundlabel.ls_format.percent_to_pixels`.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((height, width), dtype=bool)
    if len(pts) < 3:
        return out
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    row_first = max(int(np.floor(lo.min() - 0.5)), 0)
    row_last = min(int(np.ceil(hi.max() - 0.5)), height - 1)
    cols = np.arange(width) + 0.5
    for row in range(row_first, row_last + 1):
        yc = row + 0.5
        crossing = (y0 > yc) != (y1 > yc)
        if not crossing.any():
            continue
        xa, ya, xb, yb = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (yc - ya) * (xb - xa) / (yb - ya))
        inside = np.searchsorted(xs, cols, side="right") % 2 == 1
        out[row] = inside
    return out
