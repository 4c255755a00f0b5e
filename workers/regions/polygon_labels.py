"""``PolygonLabels``: one closed polygon per connected component, holes bridged into the outline.

Options (tag attributes) besides the common ones (:class:`~workers.regions.base.ControlModel`):

- ``polygon_tolerance``: Douglas-Peucker tolerance in pixels (default 1.0), capped at a tenth of the
  region's area / perimeter so that small and thin regions keep their shape. ``0`` gives the exact
  pixel-edge outline (every pixel corner where the outline turns).
- ``min_hole_area``: holes smaller than this are filled (pixels if >= 1, fraction of the image if < 1;
  default: ``min_region_area``). Larger holes are kept: Label Studio polygons have no holes, so each is
  joined to the outline by a zero-width cut, which the even-odd and non-zero rules both leave empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from groundlabel.ls_format import pixels_to_percent
from groundlabel.spec import ControlSpec
from workers.regions.base import ControlModel
from workers.regions.geometry import (
    Components,
    bridge_holes,
    clean_ring,
    midpoint_ring,
    region_tolerance,
    ring_area,
    simplify_ring,
    upsampled_rings,
)

DEFAULT_POLYGON_TOLERANCE = 1.0


class PolygonLabelsModel(ControlModel):
    """Polygons (percent points, ``closed: true``) for a ``<PolygonLabels>`` control."""

    control_type = "PolygonLabels"

    def __init__(self, control: ControlSpec, *, threshold: float | None = None) -> None:
        super().__init__(control, threshold=threshold)
        self.tolerance = control.number("polygon_tolerance", DEFAULT_POLYGON_TOLERANCE)
        self.min_hole_area = control.number("min_hole_area", self.min_region_area)

    def component_regions(
        self, label: str, comps: Components, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        min_hole = self.min_hole_area if self.min_hole_area >= 1 else self.min_hole_area * width * height
        gh, gw = comps.image_shape
        scale = (gw * gh) / (width * height)  # options are in original pixels, the grid may be coarser
        min_hole *= scale
        tolerance = self.tolerance * np.sqrt(scale)
        results = []
        for k in range(len(comps)):
            up, x0, y0 = comps.upsampled_mask(k)
            for outer, holes in upsampled_rings(up):
                ring = component_polygon(outer, holes, tolerance, min_hole)
                if len(ring) < 3:
                    continue
                points = pixels_to_percent(ring + np.array([x0, y0]), gw, gh)
                value = {"points": points, "closed": True}
                results.append(self.result(value, label, comps.scores[k], width=width, height=height))
        return results


def component_polygon(
    outer: np.ndarray, holes: list[np.ndarray], tolerance: float, min_hole_area: float
) -> np.ndarray:
    """One hole-free ring for a component: holes below ``min_hole_area`` pixels filled, the outline and
    the other holes simplified (from their edge-midpoint rings) and the holes bridged in."""
    rings = [outer] + [h for h in holes if abs(ring_area(h)) >= max(min_hole_area, 1e-9)]
    if tolerance <= 0:
        rings = [clean_ring(r) for r in rings]
    else:
        rings = [midpoint_ring(r) for r in rings]
        eps = region_tolerance(rings, tolerance)
        rings = [simplify_ring(r, eps) for r in rings]
    return bridge_holes(rings[0], [h for h in rings[1:] if len(h) >= 3])
