"""``KeyPointLabels``: the heatmap peak per label, as GEM's point task does.

The point is the centre of the pixel where the label's score is highest among the pixels it wins
(above the threshold, in kept components). Without a score map (a binary mask), it is the pixel
farthest inside the region (distance transform). Options:

- ``keypoint_per_region="true"``: one point per connected component instead of one per label;
- ``point_width``: the point size Label Studio draws, in percent of the image width (default 1.0).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from groundlabel.spec import ControlSpec
from workers.regions.base import ControlModel
from workers.regions.geometry import Components, nearest_peak

DEFAULT_POINT_WIDTH = 1.0


class KeyPointLabelsModel(ControlModel):
    """Key points for a ``<KeyPointLabels>`` control."""

    control_type = "KeyPointLabels"

    def __init__(self, control: ControlSpec, *, threshold: float | None = None) -> None:
        super().__init__(control, threshold=threshold)
        self.per_region = self.option_bool("keypoint_per_region", False)
        self.point_width = control.number("point_width", DEFAULT_POINT_WIDTH)

    def component_regions(
        self, label: str, comps: Components, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        if self.per_region:
            groups = [(np.array([k]), comps.scores[k]) for k in range(len(comps))]
        else:
            groups = [(np.arange(len(comps)), float(np.average(comps.scores, weights=comps.areas)))]
        gh, gw = comps.image_shape
        results = []
        for ks, mean_score in groups:
            row, col = peak(comps, ks, score_map)
            value = {
                "x": round(100.0 * (col + 0.5) / gw, 4),
                "y": round(100.0 * (row + 0.5) / gh, 4),
                "width": self.point_width,
            }
            score = float(score_map[row, col]) if score_map is not None else mean_score
            results.append(self.result(value, label, score, width=width, height=height))
        return results


def peak(comps: Components, ks: np.ndarray, score_map: np.ndarray | None) -> tuple[int, int]:
    """Image ``(row, col)`` of the highest score in components ``ks``, or of their deepest pixel without
    scores; ties go to the pixel nearest the components' centroid."""
    if score_map is not None:
        top = comps.peak_scores[ks]
        at = ks[top == top.max()]
        ties = int(comps.peaks[at, 2].sum())
        if ties == 1:
            row, col = comps.peaks[at[0], :2]
        else:
            x0, y0 = comps.window[:2]
            runs, starts, ends = comps.runs, comps.starts, comps.ends
            row, col = nearest_peak(runs, starts, ends, ks, at, score_map, top.max(), x0, y0)
        return int(row), int(col)
    x0, y0 = comps.window[:2]
    row, col = mask_peak(comps.window_mask(ks), None)
    return row + y0, col + x0


def mask_peak(mask: np.ndarray, score_map: np.ndarray | None) -> tuple[int, int]:
    """(row, col) of the highest score inside ``mask``, or of the deepest mask pixel without scores.

    Ties go to the pixel nearest the mask's centroid.
    """
    if score_map is not None:
        inside = np.where(mask, score_map, -np.inf)
    else:
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        inside = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    rows, cols = np.nonzero(inside == inside.max())
    if rows.size == 1:
        return int(rows[0]), int(cols[0])
    my, mx = (float(v.mean()) for v in np.nonzero(mask))
    k = int(np.argmin((rows - my) ** 2 + (cols - mx) ** 2))
    return int(rows[k]), int(cols[k])
