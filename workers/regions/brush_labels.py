"""``BrushLabels``: Label Studio brush RLE at the original image size.

One region per label holds all its kept components (``brush_per_region="true"``: one region per
connected component instead). The RLE is Label Studio's own (``groundlabel.ls_format.brush_rle_encode``),
so ``brush_rle_decode(rle, height, width)`` gives the mask back exactly.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from groundlabel.ls_format import brush_rle_encode
from groundlabel.spec import ControlSpec
from workers.regions.base import ControlModel
from workers.regions.geometry import Components


class BrushLabelsModel(ControlModel):
    """Brush masks (``format: rle``) for a ``<BrushLabels>`` control."""

    control_type = "BrushLabels"

    def __init__(self, control: ControlSpec, *, threshold: float | None = None) -> None:
        super().__init__(control, threshold=threshold)
        self.per_region = self.option_bool("brush_per_region", False)

    def component_regions(
        self, label: str, comps: Components, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        if self.per_region:
            results = []
            for k in range(len(comps)):
                mask = comps.image_mask(np.array([k]))
                results.append(self._brush(mask, label, comps.scores[k], width, height))
            return results
        mask = comps.kept_mask()
        score = float(np.average(comps.scores, weights=comps.areas))
        return [self._brush(mask, label, score, width, height)]

    def _brush(self, mask: np.ndarray, label: str, score: float, width: int, height: int) -> dict[str, Any]:
        if mask.shape != (height, width):  # a coarser working grid: back to the original size
            small = mask.view(np.uint8)
            mask = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST).view(bool)
        value = {"format": "rle", "rle": brush_rle_encode(mask)}
        return self.result(value, label, score, width=width, height=height)
