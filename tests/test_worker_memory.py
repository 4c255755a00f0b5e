"""Bounded memory in the class-prompt path: GEM's lazily upsampled maps, the regions' working size, and
the regions of a large image at that size against the full-size computation (the documented tolerance:
masks within IoU 0.97, boxes and key points within 1.5 working pixels)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import make_tiny_gem_engine
from PIL import Image

import workers.regions.base as regions_base
from groundlabel.ls_format import brush_rle_decode, percent_to_pixels
from groundlabel.spec import ControlSpec, LabelingSpec
from workers import pipeline
from workers.regions import MAX_WORKING_SIDE, polygon_to_mask, regions_from_scores, working_size


def test_working_size_bounds_the_longer_side() -> None:
    assert working_size(1000, 500) == (1000, 500)
    assert working_size(MAX_WORKING_SIDE, 7) == (MAX_WORKING_SIDE, 7)
    assert working_size(9000, 9000) == (MAX_WORKING_SIDE, MAX_WORKING_SIDE)
    assert working_size(100, 4096) == (50, MAX_WORKING_SIDE)
    assert working_size(100_000, 1) == (MAX_WORKING_SIDE, 1)


def test_lazy_maps_are_the_eager_maps() -> None:
    engine = make_tiny_gem_engine(seed=1)
    images = [Image.new("RGB", (70, 50), "red"), Image.new("RGB", (33, 90), "blue")]
    prompts = ["cat", "dog", "cat", "a red thing"]
    eager = engine.heatmaps(images, prompts, groups=["a", "b", "a", "c"])
    lazy = engine.heatmaps(images, prompts, groups=["a", "b", "a", "c"], lazy=True)
    for e, m in zip(eager, lazy, strict=True):
        assert m.shape == e.shape and len(m) == len(prompts)
        np.testing.assert_allclose(np.stack(list(m)), e, rtol=0, atol=1e-6)
    small = engine.heatmaps(images, prompts, sizes=[(20, 10), (5, 9)])
    assert [m.shape for m in small] == [(4, 10, 20), (4, 9, 5)]
    with pytest.raises(Exception, match="sizes has 1 entries"):
        engine.heatmaps(images, prompts, sizes=[(1, 1)])


def test_large_images_go_through_gem_alone() -> None:
    big, small = Image.new("RGB", (9000, 9000)), Image.new("RGB", (640, 480))
    groups = pipeline._map_groups([small, small, big, small, big], n_prompts=20)
    assert [len(g) for g in groups] == [2, 1, 1, 1]
    assert [len(g) for g in pipeline._map_groups([small] * 30, n_prompts=1)] == [30]


def smooth_maps(width: int, height: int, labels: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(labels):
        coarse = cv2.GaussianBlur(rng.random((12, 40)).astype(np.float32), (0, 0), 1.0)
        coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min() + 1e-9)
        out[f"l{i}"] = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.slow
def test_regions_at_the_working_size_match_the_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    width, height = 5000, 1200  # worked at 2048 x 492
    gw, gh = working_size(width, height)
    maps = smooth_maps(width, height, 3, seed=5)
    labels = list(maps)
    controls = [
        ControlSpec(kind.lower(), kind, "image", labels, {n: [n] for n in labels}, {})
        for kind in ("PolygonLabels", "BrushLabels", "RectangleLabels", "KeyPointLabels")
    ]
    spec = LabelingSpec("image", "image", controls)
    small_maps = {k: cv2.resize(v, (gw, gh), interpolation=cv2.INTER_LINEAR) for k, v in maps.items()}
    bounded, _ = regions_from_scores(spec, small_maps, width=width, height=height, threshold=0.5)
    monkeypatch.setattr(regions_base, "MAX_WORKING_SIDE", 10**6)
    full, _ = regions_from_scores(spec, maps, width=width, height=height, threshold=0.5)

    def of(results, kind, label):
        return [r for r in results if r["type"] == kind and r["value"][kind] == [label]]

    cell_x, cell_y = 100.0 / gw, 100.0 / gh  # one working pixel, in percent
    for label in labels:
        a, b = of(full, "polygonlabels", label), of(bounded, "polygonlabels", label)
        area = [np.zeros((height // 4, width // 4), bool) for _ in range(2)]
        for canvas, results in zip(area, (a, b), strict=True):
            for r in results:
                canvas ^= polygon_to_mask(
                    percent_to_pixels(r["value"]["points"], width // 4, height // 4), width // 4, height // 4
                )
        assert iou(*area) >= 0.97
        (fa,), (ba,) = of(full, "brushlabels", label), of(bounded, "brushlabels", label)
        assert (fa["original_width"], fa["original_height"]) == (ba["original_width"], ba["original_height"])
        masks = [brush_rle_decode(r["value"]["rle"], height, width) for r in (fa, ba)]
        assert iou(*masks) >= 0.97
        boxes_a, boxes_b = of(full, "rectanglelabels", label), of(bounded, "rectanglelabels", label)
        assert len(boxes_a) == len(boxes_b)
        for ra in boxes_a:
            near = min(
                boxes_b,
                key=lambda rb, ra=ra: sum(
                    abs(ra["value"][k] - rb["value"][k]) for k in ("x", "y", "width", "height")
                ),
            )
            for key, cell in (("x", cell_x), ("width", cell_x), ("y", cell_y), ("height", cell_y)):
                assert abs(ra["value"][key] - near["value"][key]) <= 1.5 * cell
        (pa,), (pb,) = of(full, "keypointlabels", label), of(bounded, "keypointlabels", label)
        assert abs(pa["value"]["x"] - pb["value"]["x"]) <= 1.5 * cell_x
        assert abs(pa["value"]["y"] - pb["value"]["y"]) <= 1.5 * cell_y
