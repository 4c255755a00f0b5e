"""``refine=sam``: coarse masks (GEM's thresholded maps, LAVT's masks) made sharp by a promptable SAM.

The rule (docs/sam.md): every 8-connected part of the coarse mask of at least ``min_area`` pixels prompts
SAM with its bounding box and its peak points (the highest score inside it and the point deepest inside
it). SAM's most confident mask is taken: when SAM's predicted IoU of it is below ``min_score`` (default
:data:`~workers.models.sam.config.DEFAULT_MIN_SCORE`) SAM sees no object there and the part is removed;
otherwise the mask replaces the part when their IoU is at least ``min_iou`` (default
:data:`~workers.models.sam.config.DEFAULT_MIN_IOU`), else the coarse part stays. SAM answers a box, so it
never moves a part far from where the coarse model put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .config import DEFAULT_MIN_IOU, DEFAULT_MIN_SCORE
from .engine import Prompt

#: Parts smaller than this many pixels are kept as they are (too small to prompt anything reliable).
MIN_PART_AREA = 4


@dataclass
class Part:
    """One connected part of a coarse mask and the prompt it gives SAM."""

    mask: np.ndarray  # bool [H, W]
    prompt: Prompt


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel centre deepest inside ``mask`` (largest distance to its outside), as (x, y)."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return col + 0.5, row + 0.5


def mask_parts(
    mask: np.ndarray, score_map: np.ndarray | None = None, min_area: int = MIN_PART_AREA
) -> list[Part]:
    """The connected parts of ``mask`` with their prompts: the part's box and its peak points."""
    mask = np.asarray(mask, dtype=bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    parts = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        part = labels == k
        points = [interior_point(part[y : y + h, x : x + w])]
        points = [(px + x, py + y) for px, py in points]
        if score_map is not None:
            crop = np.where(part[y : y + h, x : x + w], score_map[y : y + h, x : x + w], -np.inf)
            row, col = np.unravel_index(int(np.argmax(crop)), crop.shape)
            peak = (x + col + 0.5, y + row + 0.5)
            if max(abs(peak[0] - points[0][0]), abs(peak[1] - points[0][1])) >= 2:
                points.append(peak)
        parts.append(
            Part(part, Prompt(points, [1] * len(points), (float(x), float(y), float(x + w), float(y + h))))
        )
    return parts


def refine_mask(
    sam: Any,
    image: Any,
    mask: np.ndarray,
    score_map: np.ndarray | None = None,
    *,
    min_iou: float | None = None,
    min_score: float | None = None,
    min_area: int = MIN_PART_AREA,
) -> tuple[np.ndarray, dict[str, int]]:
    """``mask`` with each part replaced by SAM's most confident mask for its prompt where they agree (IoU
    ≥ ``min_iou``, default the engine's ``config.min_iou``), and removed where SAM's predicted IoU of that
    mask is below ``min_score`` (default ``config.min_score``: SAM sees no object there). Returns the mask
    and counts of parts ``kept`` (SAM's), ``rejected`` (the coarse part stays) and ``dropped`` (removed)."""
    mask = np.asarray(mask, dtype=bool)
    config = getattr(sam, "config", None)
    threshold = getattr(config, "min_iou", DEFAULT_MIN_IOU) if min_iou is None else min_iou
    floor = getattr(config, "min_score", DEFAULT_MIN_SCORE) if min_score is None else min_score
    parts = mask_parts(mask, score_map, min_area)
    stats = {"kept": 0, "rejected": 0, "dropped": 0}
    if not parts:
        return mask.copy(), stats
    removed = np.zeros_like(mask)
    added = np.zeros_like(mask)
    for part, (candidates, scores) in zip(parts, sam.segment(image, [p.prompt for p in parts]), strict=True):
        if float(scores[0]) < floor:  # candidates come best first
            removed |= part.mask
            stats["dropped"] += 1
        elif mask_iou(candidates[0], part.mask) >= threshold:
            removed |= part.mask
            added |= candidates[0]
            stats["kept"] += 1
        else:
            stats["rejected"] += 1
    return (mask & ~removed) | added, stats


def refine_label_map(
    sam: Any,
    image: Any,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    background: int | None = 0,
    min_iou: float | None = None,
    min_score: float | None = None,
) -> np.ndarray:
    """A label map with every class's parts refined by :func:`refine_mask`.

    ``scores``: per-class maps ``[C, H, W]`` for the peak points, indexed by label (``scores[label - 1]``
    when ``background`` is 0). Pixels a class loses become ``background``; a class's new pixels are painted
    onto background or its own pixels only, larger classes first. ``background=None`` (a map without a
    background class): the refined masks are painted over the map, larger classes first.
    """
    labels = np.asarray(labels)
    classes = [int(c) for c in np.unique(labels) if c != background]
    refined: dict[int, np.ndarray] = {}
    for c in classes:
        score = None
        if scores is not None:
            score = scores[c - 1] if background == 0 else scores[c]
        refined[c], _ = refine_mask(sam, image, labels == c, score, min_iou=min_iou, min_score=min_score)
    out = labels.copy()
    order = sorted(classes, key=lambda k: -int((labels == k).sum()))
    if background is None:
        for c in order:
            out[refined[c]] = c
        return out
    for c in classes:
        out[(labels == c) & ~refined[c]] = background
    for c in order:
        out[refined[c] & ((out == background) | (labels == c))] = c
    return out
