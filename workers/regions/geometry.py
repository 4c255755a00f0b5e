"""Mask geometry: connected components, pixel-edge outlines, simplification, holes.

Components come from one compiled labelling pass for every label at once: the pixels each label wins
are cut into horizontal runs, runs of one label touching in consecutive rows (diagonals included) are
joined, and each component keeps its runs, box, area, score sum and peak, so that converting it costs
what it holds, not the image.

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
    """The kept 8-connected components of one label (or of one mask), in output order: largest first,
    equal areas in the order OpenCV's ``connectedComponents`` numbers them on the label's window.

    Components are stored as horizontal runs of pixels (image coordinates), so each one costs what it
    holds: ``runs[starts[k]:ends[k]]`` are component k's ``(row, first col, end col)``, end exclusive.
    """

    runs: np.ndarray  # int32 [R, 3]: row, first column, end column (exclusive), grouped by component
    starts: np.ndarray  # int64 [n]: first run of each kept component
    ends: np.ndarray  # int64 [n]: end of its runs
    boxes: np.ndarray  # int64 [n, 4]: x, y, w, h in image pixels
    areas: np.ndarray  # int64 [n]: pixel counts
    scores: np.ndarray  # float64 [n]: mean score inside each component (1.0 without a score map)
    peaks: np.ndarray  # int64 [n, 3]: row, col of the first pixel (raster order) with the best score, ties
    peak_scores: np.ndarray  # float64 [n]: that best score (-inf without a score map)
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 of the label's pixels, dropped components included
    shape: tuple[int, int]  # the image's (H, W)

    def __len__(self) -> int:
        return int(self.starts.size)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image the components lie in."""
        return self.shape

    def _fill(self, ks: np.ndarray, x0: int, y0: int, shape: tuple[int, int], scale: int = 1) -> np.ndarray:
        out = np.zeros(shape, dtype=np.uint8)
        fill_runs(self.runs, self.starts, self.ends, np.asarray(ks, dtype=np.int64), x0, y0, scale, out)
        return out

    def mask(self, k: int) -> tuple[np.ndarray, int, int]:
        """The k-th kept component as a uint8 mask of its bounding box and the box's (x, y) in the image."""
        x, y, w, h = (int(v) for v in self.boxes[k])
        return self._fill(np.array([k]), x, y, (h, w)), x, y

    def upsampled_mask(self, k: int) -> tuple[np.ndarray, int, int]:
        """:meth:`mask` upsampled x2 (nearest) with a 1-pixel zero border, as :func:`upsampled_rings`
        reads it."""
        x, y, w, h = (int(v) for v in self.boxes[k])
        return self._fill(np.array([k]), x, y, (2 * h + 2, 2 * w + 2), scale=2), x, y

    def window_mask(self, ks: np.ndarray | None = None) -> np.ndarray:
        """Components ``ks`` (default: all kept) as a boolean mask of :attr:`window`."""
        x0, y0, x1, y1 = self.window
        ks = np.arange(len(self)) if ks is None else ks
        return self._fill(ks, x0, y0, (y1 - y0, x1 - x0)).view(bool)

    def image_mask(self, ks: np.ndarray | None = None) -> np.ndarray:
        """Components ``ks`` (default: all kept) as a boolean mask of the image."""
        ks = np.arange(len(self)) if ks is None else ks
        return self._fill(ks, 0, 0, self.shape).view(bool)

    def kept_mask(self) -> np.ndarray:
        """All kept components as one boolean mask of the image."""
        return self.image_mask()


@compiled
def fill_runs(
    runs: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    ks: np.ndarray,
    x0: int,
    y0: int,
    scale: int,
    out: np.ndarray,
) -> None:
    """Set to 1 the pixels of components ``ks`` in ``out``, whose pixel (0, 0) is the image's (x0, y0);
    with ``scale`` > 1 each pixel becomes a ``scale`` x ``scale`` block, placed after a 1-pixel border."""
    pad = 1 if scale > 1 else 0
    for k in ks:
        for j in range(starts[k], ends[k]):
            r = (runs[j, 0] - y0) * scale + pad
            c0 = (runs[j, 1] - x0) * scale + pad
            c1 = (runs[j, 2] - x0) * scale + pad
            for dr in range(scale):
                for c in range(c0, c1):
                    out[r + dr, c] = 1


@compiled
def index_runs(index: np.ndarray | None, best: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Horizontal runs of pixels of one label whose ``best`` score is at least ``threshold``:
    ``[R, 4]`` int32 rows of (row, first col, end col, label index), in raster order. With ``index``
    None every pixel is label 0 (numba compiles that case without the label reads)."""
    height, width = best.shape
    runs = np.empty((max(1024, 4 * height), 4), np.int32)
    n = 0
    for r in range(height):
        c = 0
        while c < width:
            while c < width and not best[r, c] >= threshold:  # a tight loop over the background
                c += 1
            if c == width:
                break
            label = 0 if index is None else index[r, c]
            start = c
            c += 1
            while c < width and best[r, c] >= threshold and (index is None or index[r, c] == label):
                c += 1
            if n == runs.shape[0]:  # twice as long (an element loop: a slice copy compiles for seconds)
                grown = np.empty((2 * n, 4), np.int32)
                for i in range(n):
                    for j in range(4):
                        grown[i, j] = runs[i, j]
                runs = grown
            runs[n, 0] = r
            runs[n, 1] = start
            runs[n, 2] = c
            runs[n, 3] = label
            n += 1
    return runs[:n]


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """Horizontal runs of the nonzero pixels of a uint8 mask, as :func:`index_runs` gives them (label 0)."""
    return index_runs(None, mask, np.uint8(1))


@compiled
def run_components(
    runs: np.ndarray, scores: np.ndarray, has_scores: bool, labels: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-connected components of the runs (runs of one label touching in the next row, diagonals
    included, are one component), numbered in the raster order of their first pixel.

    Returns ``(component of each run, stats, windows)``: windows is int64 ``[labels, 4]``, each label's
    ``x0, y0, x1, y1`` (end exclusive, zeros for a label without runs); stats is float64 ``[n, 12]``
    with per component its label, area, x0, y0, x1, y1 (end exclusive), score sum (float64, in pixel
    order, the same sum as ``np.bincount``), best score, its first row and col (raster order), how many
    pixels have it, and the component's OpenCV order key (its first 2x2 block on the label's window,
    row-major)."""
    n_runs = runs.shape[0]
    parent = np.arange(n_runs)
    prev_start = 0
    prev_end = 0
    i = 0
    while i < n_runs:
        row = runs[i, 0]
        end = i
        while end < n_runs and runs[end, 0] == row:
            end += 1
        if prev_end > prev_start and runs[prev_start, 0] == row - 1:
            j = prev_start
            for k in range(i, end):
                c0 = runs[k, 1]
                c1 = runs[k, 2]
                while j < prev_end and runs[j, 2] < c0:
                    j += 1
                m = j
                while m < prev_end and runs[m, 1] <= c1:
                    if runs[m, 3] == runs[k, 3]:
                        a = m
                        while parent[a] != a:
                            parent[a] = parent[parent[a]]
                            a = parent[a]
                        b = k
                        while parent[b] != b:
                            parent[b] = parent[parent[b]]
                            b = parent[b]
                        if a < b:
                            parent[b] = a
                        elif b < a:
                            parent[a] = b
                    m += 1
        prev_start = i
        prev_end = end
        i = end
    comp = np.empty(n_runs, np.int64)
    n = 0
    for k in range(n_runs):
        a = k
        while parent[a] != a:
            a = parent[a]
        if a == k:
            comp[k] = n
            n += 1
        else:
            comp[k] = comp[a]
    origin = np.zeros((labels, 4), np.int64)  # each label's window: x0, y0, x1, y1 (end exclusive)
    seen = np.zeros(labels, np.bool_)
    for k in range(n_runs):
        lab = runs[k, 3]
        if not seen[lab]:
            seen[lab] = True
            origin[lab, 0] = runs[k, 1]
            origin[lab, 1] = runs[k, 0]
            origin[lab, 2] = runs[k, 2]
        if runs[k, 1] < origin[lab, 0]:
            origin[lab, 0] = runs[k, 1]
        if runs[k, 2] > origin[lab, 2]:
            origin[lab, 2] = runs[k, 2]
        origin[lab, 3] = runs[k, 0] + 1
    stats = np.zeros((n, 12), np.float64)
    for k in range(n_runs):
        q = comp[k]
        r = runs[k, 0]
        c0 = runs[k, 1]
        c1 = runs[k, 2]
        lab = runs[k, 3]
        key = float(((r - origin[lab, 1]) // 2) * (width + 1) + (c0 - origin[lab, 0]) // 2)
        if stats[q, 1] == 0:
            stats[q, 0] = lab
            stats[q, 2] = c0
            stats[q, 3] = r
            stats[q, 4] = c1
            stats[q, 7] = -np.inf
            stats[q, 8] = r
            stats[q, 9] = c0
            stats[q, 11] = key
        else:
            if c0 < stats[q, 2]:  # comparisons, not min/max: those double numba's compile time here
                stats[q, 2] = c0
            if c1 > stats[q, 4]:
                stats[q, 4] = c1
            if key < stats[q, 11]:
                stats[q, 11] = key
        stats[q, 1] += c1 - c0
        stats[q, 5] = r + 1
        if has_scores:
            total = stats[q, 6]
            top = stats[q, 7]
            ties = stats[q, 10]
            for c in range(c0, c1):
                v = scores[r, c]
                total += v
                if ties == 0 or v > top:
                    top = v
                    stats[q, 8] = r
                    stats[q, 9] = c
                    ties = 1
                elif v == top:
                    ties += 1
            stats[q, 6] = total
            stats[q, 7] = top
            stats[q, 10] = ties
        else:
            stats[q, 6] += c1 - c0
    return comp, stats, origin


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
def nearest_peak(
    runs: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    ks: np.ndarray,
    at: np.ndarray,
    scores: np.ndarray,
    top: float,
    x0: int,
    y0: int,
) -> np.ndarray:
    """``[row, col]`` (image pixels) of the pixel of components ``at`` with score ``top`` nearest the
    centroid of components ``ks`` (first in raster order among equals); distances are taken relative
    to ``(x0, y0)``, as ``np.nonzero`` on that window would give them."""
    n = 0
    sum_r = 0
    sum_c = 0
    for k in ks:
        for j in range(starts[k], ends[k]):
            length = runs[j, 2] - runs[j, 1]
            n += length
            sum_r += (runs[j, 0] - y0) * length
            sum_c += (runs[j, 1] - x0 + runs[j, 2] - x0 - 1) * length // 2
    my = sum_r / n
    mx = sum_c / n
    best = np.inf
    out = np.full(2, -1, np.int64)
    for k in at:
        for j in range(starts[k], ends[k]):
            r = runs[j, 0]
            for c in range(runs[j, 1], runs[j, 2]):
                if scores[r, c] == top:
                    dr = (r - y0) - my
                    dc = (c - x0) - mx
                    d = dr * dr + dc * dc
                    if d < best or (d == best and (r < out[0] or (r == out[0] and c < out[1]))):
                        best = d
                        out[0] = r
                        out[1] = c
    return out


_NO_SCORES = np.zeros((1, 1), np.float32)


def _empty(shape: tuple[int, int]) -> Components:
    z = np.zeros(0, np.int64)
    return Components(
        runs=np.zeros((0, 3), np.int32),
        starts=z,
        ends=z,
        boxes=np.zeros((0, 4), np.int64),
        areas=z,
        scores=np.zeros(0),
        peaks=np.zeros((0, 3), np.int64),
        peak_scores=np.zeros(0),
        window=(0, 0, 0, 0),
        shape=(int(shape[0]), int(shape[1])),
    )


def label_components(
    runs: np.ndarray, scores: np.ndarray | None, labels: int, min_area: float, shape: tuple[int, int]
) -> list[Components | None]:
    """Per label index, the components of the runs (:func:`index_runs`) that have at least ``min_area``
    pixels (None for a label without any): one labelling pass for all labels, then each label costs what
    its components hold. ``scores`` is the image's score map (None: every score is 1)."""
    shape = (int(shape[0]), int(shape[1]))
    has_scores = scores is not None
    score_arr = np.ascontiguousarray(scores, dtype=np.float32) if has_scores else _NO_SCORES
    comp, stats, windows = run_components(runs, score_arr, has_scores, labels, shape[1])
    out: list[Components | None] = [None] * labels
    if len(stats) == 0:
        return out
    counts = np.bincount(comp, minlength=len(stats))
    ends = np.cumsum(counts)
    starts = ends - counts
    grouped = np.ascontiguousarray(runs[np.argsort(comp, kind="stable"), :3])
    label = stats[:, 0].astype(np.int64)
    areas = stats[:, 1].astype(np.int64)
    order = np.lexsort((stats[:, 11], -areas, label))  # per label: largest first, then OpenCV's order
    order = order[areas[order] >= max(min_area, 1)]
    if order.size == 0:
        return out
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    for ids in np.split(order, cuts):
        s = stats[ids]
        x0, y0, x1, y1 = (int(v) for v in windows[int(s[0, 0])])
        boxes = np.stack([s[:, 2], s[:, 3], s[:, 4] - s[:, 2], s[:, 5] - s[:, 3]], axis=1).astype(np.int64)
        out[int(s[0, 0])] = Components(
            runs=grouped,
            starts=starts[ids],
            ends=ends[ids],
            boxes=boxes,
            areas=areas[ids],
            scores=s[:, 6] / s[:, 1] if has_scores else np.ones(ids.size),
            peaks=s[:, 8:11].astype(np.int64),
            peak_scores=s[:, 7] if has_scores else np.full(ids.size, -np.inf),
            window=(x0, y0, x1, y1),
            shape=shape,
        )
    return out


def find_components(mask: np.ndarray, score_map: np.ndarray | None, min_area: float) -> Components:
    """The 8-connected components of a 2-D mask with at least ``min_area`` pixels (their mean scores from
    ``score_map``, same shape, or 1.0 without one)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    m = np.ascontiguousarray(mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8))
    comps = label_components(mask_runs(m), score_map, 1, min_area, m.shape)[0]
    return comps if comps is not None else _empty(m.shape)


def _next(a: np.ndarray) -> np.ndarray:
    """``np.roll(a, -1, axis=0)``: each vertex's successor on a closed ring."""
    return np.concatenate((a[1:], a[:1]))


def _prev(a: np.ndarray) -> np.ndarray:
    """``np.roll(a, 1, axis=0)``: each vertex's predecessor on a closed ring."""
    return np.concatenate((a[-1:], a[:-1]))


def ring_area(ring: np.ndarray) -> float:
    """Signed area of a closed ring ``(N, 2)`` (shoelace; positive = clockwise on screen)."""
    return float(shoelace(np.asarray(ring, dtype=np.float64)))


@compiled
def shoelace(ring: np.ndarray) -> float:
    """:func:`ring_area` of a float64 ``(N, 2)`` ring: ``(sum x[i] y[i+1] - sum x[i+1] y[i]) / 2``, 0 below
    3 vertices (exact, whatever the order of the sums, for pixel corners and edge midpoints)."""
    n = ring.shape[0]
    if n < 3:
        return 0.0
    a = 0.0
    b = 0.0
    for i in range(n):
        j = i + 1 if i + 1 < n else 0
        a += ring[i, 0] * ring[j, 1]
        b += ring[j, 0] * ring[i, 1]
    return 0.5 * (a - b)


def ring_perimeter(ring: np.ndarray) -> float:
    """Perimeter of a closed ring."""
    if len(ring) < 2:
        return 0.0
    return float(np.linalg.norm(_next(ring) - ring, axis=1).sum())


def clean_ring(points: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed ring (lossless)."""
    if len(points) == 0:
        return points
    return clean_points(np.asarray(points, dtype=np.float64), True)


@compiled
def clean_points(points: np.ndarray, collinear: bool) -> np.ndarray:
    """:func:`clean_ring` of a non-empty float64 ``(N, 2)`` ring: vertices equal to their predecessor
    dropped, then with ``collinear`` those where the ring goes straight on (kept when fewer than 3 would
    remain)."""
    n = points.shape[0]
    keep = np.empty(n, np.bool_)
    kept = 0
    for i in range(n):
        p = i - 1 if i > 0 else n - 1
        keep[i] = points[i, 0] != points[p, 0] or points[i, 1] != points[p, 1]
        kept += keep[i]
    pts = points[keep] if kept > 0 else points[:1].copy()
    m = pts.shape[0]
    if not collinear or m < 3:
        return pts
    turn = np.empty(m, np.bool_)
    turns = 0
    for i in range(m):
        p = i - 1 if i > 0 else m - 1
        q = i + 1 if i + 1 < m else 0
        d1x = pts[i, 0] - pts[p, 0]
        d1y = pts[i, 1] - pts[p, 1]
        d2x = pts[q, 0] - pts[i, 0]
        d2y = pts[q, 1] - pts[i, 1]
        turn[i] = (d1x * d2y - d1y * d2x) != 0 or (d1x * d2x + d1y * d2y) <= 0
        turns += turn[i]
    return pts[turn] if turns >= 3 else pts


def mask_rings(crop: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Exact pixel-edge outlines of a uint8 mask: ``[(outer, [holes...]), ...]``, one per component.

    Rings are float64 ``(N, 2)`` arrays of (x, y) pixel-corner coordinates relative to the crop, one
    vertex per unit step along the pixel edges; outer rings are oriented with positive
    :func:`ring_area`, holes with negative.
    """
    up = cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    return upsampled_rings(cv2.copyMakeBorder(up, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0))


def upsampled_rings(up: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """:func:`mask_rings` of a mask given upsampled x2 (nearest) with a 1-pixel zero border
    (:meth:`Components.upsampled_mask`)."""
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    rings: list[np.ndarray] = []
    for c in contours:
        rings.append(contour_corners(c.reshape(-1, 2)))
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


def contour_corners(contour: np.ndarray) -> np.ndarray:
    """Pixel corners (float64 ``(N, 2)``, crop coordinates) of a contour traced on the x2 upsampled,
    bordered mask: each sub-pixel centre snapped to its nearest corner, repeats of the previous dropped."""
    return clean_points(snapped_corners(contour), False)


@compiled
def snapped_corners(contour: np.ndarray) -> np.ndarray:
    """Each sub-pixel centre of a contour traced on the x2 upsampled, bordered mask snapped to its
    nearest pixel corner (float64 ``(N, 2)``, crop coordinates)."""
    n = contour.shape[0]
    corners = np.empty((n, 2), np.float64)
    for i in range(n):
        corners[i, 0] = np.rint(((contour[i, 0] - 1.0) + 0.5) / 2.0)  # - 1: undo the border
        corners[i, 1] = np.rint(((contour[i, 1] - 1.0) + 0.5) / 2.0)
    return corners


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
