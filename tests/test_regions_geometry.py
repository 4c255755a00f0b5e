"""Polygons from masks: rasterised back, they must match the source mask (IoU >= 0.97)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from groundlabel.ls_format import percent_to_pixels
from groundlabel.spec import ControlSpec
from workers.regions import polygon_to_mask, regions_from_mask
from workers.regions.geometry import bridge_holes, mask_rings, ring_area, simplify_ring


def polygon_control(**options: str) -> ControlSpec:
    return ControlSpec("poly", "PolygonLabels", "image", ["thing"], {"thing": ["thing"]}, dict(options))


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def shapes() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    m = disc(128, 128, 64, 64, 50) & ~disc(128, 128, 45, 60, 12) & ~disc(128, 128, 85, 70, 8)
    out["holes"] = m
    out["ring"] = disc(96, 120, 60, 48, 40) & ~disc(96, 120, 60, 48, 30)
    rng = np.random.default_rng(3)
    many = np.zeros((160, 200), bool)
    for _ in range(40):
        cx, cy, r = rng.uniform(0, 200), rng.uniform(0, 160), rng.uniform(1.5, 9)
        many |= disc(160, 200, cx, cy, r)
    out["many"] = many
    thin = np.zeros((64, 80), bool)
    thin[10, 5:70] = True  # horizontal 1-px line
    thin[15:60, 75] = True  # vertical 1-px line
    for i in range(40):
        thin[20 + i, 5 + i] = True  # diagonal 1-px line (8-connected)
        thin[20 + i, 30 + i : 32 + i] = True  # diagonal 2-px band
    out["thin"] = thin
    border = np.zeros((50, 70), bool)
    border[:, :12] = True  # touches three borders
    border[40:, 30:] = True  # touches bottom and right
    border[0, 69] = True  # corner pixel
    out["borders"] = border
    single = np.zeros((40, 30), bool)
    single[17, 11] = True
    out["single"] = single
    corner = np.zeros((40, 30), bool)
    corner[0, 0] = True
    out["corner_pixel"] = corner
    out["full"] = np.ones((33, 47), bool)
    checker = np.zeros((20, 20), bool)
    checker[::2, ::2] = True
    checker[1::2, 1::2] = True  # diagonal neighbours only: one 8-connected component
    out["checker"] = checker
    blob = cv2.GaussianBlur(rng.random((120, 150)).astype(np.float32), (0, 0), 4)
    out["blurred_noise"] = blob > np.median(blob)
    return out


def rasterise_results(results: list[dict], width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    for r in results:
        out |= polygon_to_mask(percent_to_pixels(r["value"]["points"], width, height), width, height)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("name", sorted(shapes()))
def test_polygons_rasterise_back_at_default_tolerance(name: str) -> None:
    mask = shapes()[name]
    h, w = mask.shape
    results = regions_from_mask(polygon_control(), "thing", mask, None, width=w, height=h)
    assert results, name
    for r in results:
        assert r["type"] == "polygonlabels" and r["value"]["closed"] is True
        assert r["value"]["polygonlabels"] == ["thing"]
        pts = np.asarray(r["value"]["points"])
        assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
        assert pts.min() >= 0.0 and pts.max() <= 100.0
    assert iou(rasterise_results(results, w, h), mask) >= 0.97, name


@pytest.mark.parametrize("name", sorted(shapes()))
def test_polygons_are_exact_without_simplification(name: str) -> None:
    mask = shapes()[name]
    h, w = mask.shape
    control = polygon_control(polygon_tolerance="0", min_region_area="0")
    results = regions_from_mask(control, "thing", mask, None, width=w, height=h)
    assert np.array_equal(rasterise_results(results, w, h), mask), name


def test_one_region_per_component_and_holes_are_kept() -> None:
    mask = shapes()["holes"]
    results = regions_from_mask(polygon_control(), "thing", mask, None, width=128, height=128)
    assert len(results) == 1
    back = rasterise_results(results, 128, 128)
    assert not back[60, 45] and not back[70, 85]  # the holes' centres stay empty
    n_components = cv2.connectedComponents(shapes()["many"].astype(np.uint8), connectivity=8)[0] - 1
    results = regions_from_mask(
        polygon_control(min_region_area="0"), "thing", shapes()["many"], None, width=200, height=160
    )
    assert len(results) == n_components


def test_small_holes_filled_and_small_fragments_dropped() -> None:
    mask = disc(100, 100, 50, 50, 40)
    mask[50, 50] = False  # a one-pixel hole
    mask[2, 2] = True  # a one-pixel fragment
    control = polygon_control(min_region_area="5", min_hole_area="4")
    results = regions_from_mask(control, "thing", mask, None, width=100, height=100)
    assert len(results) == 1
    back = rasterise_results(results, 100, 100)
    assert back[50, 50] and not back[2, 2]


def test_tolerance_reduces_points() -> None:
    mask = disc(400, 400, 200, 200, 180)
    fine = regions_from_mask(
        polygon_control(polygon_tolerance="0"), "thing", mask, None, width=400, height=400
    )
    coarse = regions_from_mask(
        polygon_control(polygon_tolerance="3"), "thing", mask, None, width=400, height=400
    )
    assert len(coarse[0]["value"]["points"]) < len(fine[0]["value"]["points"]) / 4
    assert iou(rasterise_results(coarse, 400, 400), mask) >= 0.97


def test_rings_orientation_and_bridging() -> None:
    mask = shapes()["ring"].astype(np.uint8)
    ((outer, holes),) = mask_rings(mask)
    assert ring_area(outer) > 0 and len(holes) == 1 and ring_area(holes[0]) < 0
    assert abs(ring_area(outer) + ring_area(holes[0]) - mask.sum()) < 1e-6
    bridged = bridge_holes(outer, holes)
    assert len(bridged) == len(outer) + len(holes[0]) + 2


def test_simplify_keeps_tiny_squares() -> None:
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    assert np.array_equal(simplify_ring(square, 5.0), square)


def _distance_to_outline(points: np.ndarray, pts: np.ndarray) -> np.ndarray:
    a, b = pts, np.roll(pts, -1, axis=0)
    ab = b - a
    t = np.clip(((points[:, None, :] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    closest = a + t[..., None] * ab
    return np.linalg.norm(points[:, None, :] - closest, axis=-1).min(axis=1)


def test_polygon_to_mask_agrees_with_opencv() -> None:
    rng = np.random.default_rng(0)
    filled = 0
    for _ in range(20):
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(5, 20, n)
        pts = np.stack([30 + radius * np.cos(angles), 25 + radius * np.sin(angles)], axis=1)
        ours = polygon_to_mask(pts, 60, 50)
        # OpenCV at 16x (4 fractional bits), sampled at pixel centres; fillPoly also fills the pixels
        # its edges touch, so centres closer than 1/8 pixel to the outline may differ.
        big = np.zeros((50 * 16, 60 * 16), np.uint8)
        cv2.fillPoly(big, [np.rint((pts * 16 - 0.5) * 16).astype(np.int32)], 1, shift=4)
        ref = big[8::16, 8::16].astype(bool)
        differ = np.argwhere(ours != ref)
        filled += int(ours.sum())
        if len(differ):
            centres = differ[:, ::-1] + 0.5
            assert _distance_to_outline(centres, pts).max() < 0.125
    assert filled > 5000
