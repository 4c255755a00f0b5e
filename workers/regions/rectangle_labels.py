"""``RectangleLabels``: one axis-aligned box per connected component.

The box is the component's pixel bounding box in the pixel-edge convention (a component spanning
columns 3..7 gives ``x = 3``, ``width = 5`` pixels), in percent, with ``rotation: 0``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.regions.base import ControlModel
from workers.regions.geometry import Components


class RectangleLabelsModel(ControlModel):
    """Boxes for a ``<RectangleLabels>`` control."""

    control_type = "RectangleLabels"

    def component_regions(
        self, label: str, comps: Components, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        gh, gw = comps.image_shape  # percent of the grid the components lie on
        results = []
        for k in range(len(comps)):
            x, y, w, h = (int(v) for v in comps.boxes[k])
            value = {
                "x": _pct(x, gw),
                "y": _pct(y, gh),
                "width": _pct(w, gw),
                "height": _pct(h, gh),
                "rotation": 0,
            }
            results.append(self.result(value, label, comps.scores[k], width=width, height=height))
        return results


def _pct(v: float, size: int) -> float:
    return round(float(np.clip(100.0 * v / size, 0.0, 100.0)), 4)
