"""Per-control conversion from score maps: thresholds, labels, brush RLE, boxes, key points."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_decode
from groundlabel.spec import ControlSpec, LabelingSpec, parse_label_config
from workers.regions import (
    DEFAULT_THRESHOLD,
    control_model,
    prediction_score,
    regions_from_mask,
    regions_from_scores,
)

H, W = 60, 90


def control(kind: str, labels=("cat", "dog"), prompts=None, **options: str) -> ControlSpec:
    prompts = prompts or {label: [label] for label in labels}
    return ControlSpec(kind.lower(), kind, "image", list(labels), dict(prompts), dict(options))


def spec(*controls: ControlSpec) -> LabelingSpec:
    return LabelingSpec("image", "image", list(controls))


def blob(cx: float, cy: float, sigma: float, peak: float = 0.9) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (peak * np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


def two_blobs() -> dict[str, np.ndarray]:
    return {"cat": blob(20, 20, 6), "dog": blob(65, 40, 8, peak=0.8)}


def test_default_threshold_is_documented_value() -> None:
    assert DEFAULT_THRESHOLD == 0.5


def test_every_result_has_the_label_studio_fields() -> None:
    xml = """<View><Image name="img" value="$url"/>
      <PolygonLabels name="poly" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>
      <BrushLabels name="brush" toName="img"><Label value="cat"/><Label value="dog"/></BrushLabels>
      <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
      <KeyPointLabels name="kp" toName="img"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
    </View>"""
    results, score = regions_from_scores(parse_label_config(xml), two_blobs(), width=W, height=H)
    assert {r["type"] for r in results} == {
        "polygonlabels",
        "brushlabels",
        "rectanglelabels",
        "keypointlabels",
    }
    assert len(results) == 8  # one region per label per control
    ids = set()
    for r in results:
        assert r["to_name"] == "img" and r["from_name"] in ("poly", "brush", "box", "kp")
        assert r["original_width"] == W and r["original_height"] == H
        assert r["value"][r["type"]] in (["cat"], ["dog"])
        assert 0.0 <= r["score"] <= 1.0
        ids.add(r["id"])
    assert len(ids) == len(results)
    assert score == pytest.approx(np.mean([r["score"] for r in results]), abs=1e-4)
    json.dumps(results)  # plain JSON


def test_nothing_above_threshold_gives_no_regions_and_zero_score() -> None:
    maps = {"cat": np.full((H, W), 0.3, np.float32), "dog": np.full((H, W), 0.49, np.float32)}
    controls = [control(k) for k in ("PolygonLabels", "BrushLabels", "RectangleLabels", "KeyPointLabels")]
    results, score = regions_from_scores(spec(*controls), maps, width=W, height=H)
    assert results == [] and score == 0.0
    assert prediction_score([]) == 0.0


def test_threshold_argument_and_control_attribute_override() -> None:
    maps = {"cat": np.full((H, W), 0.3, np.float32), "dog": np.zeros((H, W), np.float32)}
    results, _ = regions_from_scores(
        spec(control("RectangleLabels")), maps, width=W, height=H, threshold=0.25
    )
    assert len(results) == 1 and results[0]["value"]["width"] == 100.0
    # the control attribute wins over the argument, in both directions
    strict = control("RectangleLabels", model_score_threshold="0.35")
    assert regions_from_scores(spec(strict), maps, width=W, height=H, threshold=0.25)[0] == []
    lenient = control("RectangleLabels", model_score_threshold="0.2")
    assert len(regions_from_scores(spec(lenient), maps, width=W, height=H)[0]) == 1


def test_label_score_is_max_over_synonyms_then_argmax_over_labels() -> None:
    yy, xx = np.mgrid[:H, :W]
    left = (xx < 45).astype(np.float32)
    maps = {
        "cat": 0.6 * left,  # cat wins on the left through its weaker synonym...
        "kitten": 0.55 * left + 0.0,
        "dog": 0.7 * (1 - left),
        "puppy": 0.58 * left,  # ...unless a dog synonym beats it there
    }
    c = control("RectangleLabels", prompts={"cat": ["cat", "kitten"], "dog": ["dog", "puppy"]})
    results, _ = regions_from_scores(spec(c), maps, width=W, height=H)
    by_label = {r["value"]["rectanglelabels"][0]: r for r in results}
    assert by_label["cat"]["value"]["x"] == 0 and by_label["cat"]["value"]["width"] == 50.0
    assert by_label["dog"]["value"]["x"] == 50.0
    assert by_label["cat"]["score"] == pytest.approx(0.6)
    assert by_label["dog"]["score"] == pytest.approx(0.7)
    maps["puppy"] = 0.65 * left
    results, _ = regions_from_scores(spec(c), maps, width=W, height=H)
    assert [r["value"]["rectanglelabels"][0] for r in results] == ["dog"]
    assert results[0]["value"]["width"] == 100.0


def test_brush_rle_round_trips_exactly() -> None:
    rng = np.random.default_rng(1)
    mask = cv2.GaussianBlur(rng.random((H, W)).astype(np.float32), (0, 0), 2.0) > 0.5
    mask[0, :] = True
    mask[:, -1] = True  # touching borders
    results = regions_from_mask(
        control("BrushLabels", min_region_area="0"), "dog", mask, None, width=W, height=H
    )
    assert len(results) == 1
    value = results[0]["value"]
    assert value["format"] == "rle" and value["brushlabels"] == ["dog"]
    assert np.array_equal(brush_rle_decode(value["rle"], H, W), mask)


def test_brush_per_region_and_scores() -> None:
    maps = two_blobs()
    maps["cat"] = np.maximum(maps["cat"], blob(75, 10, 4))  # a second cat component
    c = control("BrushLabels", brush_per_region="true")
    results, _ = regions_from_scores(spec(c), maps, width=W, height=H)
    cats = [r for r in results if r["value"]["brushlabels"] == ["cat"]]
    assert len(cats) == 2
    union = np.zeros((H, W), bool)
    for r in cats:
        m = brush_rle_decode(r["value"]["rle"], H, W)
        assert not (union & m).any()
        union |= m
        assert r["score"] == pytest.approx(float(maps["cat"][m].mean()), abs=1e-4)
    assert np.array_equal(union, (maps["cat"] >= 0.5) & (maps["cat"] > maps["dog"]))


def test_boxes_match_component_bounding_boxes() -> None:
    rng = np.random.default_rng(2)
    mask = np.zeros((H, W), bool)
    for _ in range(8):
        y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
        mask[y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = True
    mask[H - 3 :, W - 5 :] = True  # touches the bottom-right corner
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    expected = sorted(tuple(int(v) for v in stats[i, :4]) for i in range(1, n))
    results = regions_from_mask(
        control("RectangleLabels", min_region_area="0"), "cat", mask, None, width=W, height=H
    )
    got = []
    for r in results:
        v = r["value"]
        assert v["rotation"] == 0 and v["rectanglelabels"] == ["cat"]
        assert v["x"] >= 0 and v["x"] + v["width"] <= 100.0001 and v["y"] + v["height"] <= 100.0001
        got.append(
            tuple(
                round(q)
                for q in (v["x"] * W / 100, v["y"] * H / 100, v["width"] * W / 100, v["height"] * H / 100)
            )
        )
    assert sorted(got) == expected


def test_keypoint_at_the_peak() -> None:
    maps = {"cat": blob(30.5, 12.5, 5), "dog": blob(70.5, 44.5, 6, peak=0.75)}
    results, _ = regions_from_scores(
        spec(control("KeyPointLabels", point_width="2")), maps, width=W, height=H
    )
    points = {r["value"]["keypointlabels"][0]: r for r in results}
    assert points["cat"]["value"]["x"] == pytest.approx(100 * 30.5 / W, abs=1e-3)
    assert points["cat"]["value"]["y"] == pytest.approx(100 * 12.5 / H, abs=1e-3)
    assert points["dog"]["value"]["x"] == pytest.approx(100 * 70.5 / W, abs=1e-3)
    assert points["dog"]["value"]["y"] == pytest.approx(100 * 44.5 / H, abs=1e-3)
    assert points["cat"]["value"]["width"] == 2.0
    assert points["cat"]["score"] == pytest.approx(0.9, abs=1e-3)


def test_keypoint_per_region_and_from_mask() -> None:
    maps = {"cat": np.maximum(blob(20.5, 20.5, 5), blob(70.5, 30.5, 5, peak=0.7)), "dog": np.zeros((H, W))}
    c = control("KeyPointLabels", keypoint_per_region="true")
    results, _ = regions_from_scores(spec(c), maps, width=W, height=H)
    assert len(results) == 2
    mask = np.zeros((H, W), bool)
    mask[10:31, 40:81] = True  # 21 x 41: the deepest pixel is the centre (row 20, col 60)
    (r,) = regions_from_mask(control("KeyPointLabels"), "dog", mask, None, width=W, height=H)
    assert r["value"]["x"] == pytest.approx(100 * 60.5 / W) and r["value"]["y"] == pytest.approx(
        100 * 20.5 / H
    )


def test_regions_from_mask_scores_and_resizing() -> None:
    mask = np.zeros((30, 45), bool)
    mask[5:20, 10:30] = True
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    (r,) = regions_from_mask(control("PolygonLabels"), "cat", mask, prob, width=90, height=60)
    assert r["original_width"] == 90 and r["score"] == pytest.approx(0.8, abs=0.03)
    (r,) = regions_from_mask(control("PolygonLabels"), "cat", mask, None, width=45, height=30)
    assert r["score"] == 1.0
    assert (
        regions_from_mask(control("PolygonLabels"), "cat", np.zeros((30, 45)), None, width=45, height=30)
        == []
    )


def test_min_region_area_in_pixels_and_fraction() -> None:
    mask = np.zeros((H, W), bool)
    mask[5:8, 5:8] = True  # 9 px
    mask[30:50, 30:60] = True  # 600 px
    as_pixels = regions_from_mask(
        control("RectangleLabels", min_region_area="10"), "cat", mask, None, width=W, height=H
    )
    as_fraction = regions_from_mask(
        control("RectangleLabels", min_region_area="0.01"), "cat", mask, None, width=W, height=H
    )  # 54 px
    keep_all = regions_from_mask(control("RectangleLabels"), "cat", mask, None, width=W, height=H)
    assert len(as_pixels) == len(as_fraction) == 1 and len(keep_all) == 2


def test_model_skip_and_option_errors() -> None:
    maps = two_blobs()
    assert (
        regions_from_scores(spec(control("PolygonLabels", model_skip="true")), maps, width=W, height=H)[0]
        == []
    )
    for bad in (
        {"model_score_threshold": "high"},
        {"model_score_threshold": "1.5"},
        {"polygon_tolerance": "-1"},
        {"model_skip": "maybe"},
    ):
        with pytest.raises(UserError, match="control 'polygonlabels'"):
            control_model(control("PolygonLabels", **bad))


def test_missing_prompt_and_bad_label_are_reported() -> None:
    with pytest.raises(ValueError, match="no score map for prompt 'dog'"):
        regions_from_scores(spec(control("PolygonLabels")), {"cat": blob(10, 10, 3)}, width=W, height=H)
    with pytest.raises(UserError, match="no label 'bird'"):
        regions_from_mask(control("PolygonLabels"), "bird", np.ones((H, W)), None, width=W, height=H)
    with pytest.raises(ValueError, match="size must be positive"):
        regions_from_scores(spec(control("PolygonLabels")), two_blobs(), width=0, height=H)


def test_score_maps_of_another_size_are_resized() -> None:
    small = {k: cv2.resize(v, (W // 3, H // 3), interpolation=cv2.INTER_AREA) for k, v in two_blobs().items()}
    results, _ = regions_from_scores(spec(control("RectangleLabels")), small, width=W, height=H)
    full, _ = regions_from_scores(spec(control("RectangleLabels")), two_blobs(), width=W, height=H)
    assert len(results) == len(full) == 2
    for a, b in zip(results, full, strict=True):
        assert (
            abs(a["value"]["x"] - b["value"]["x"]) < 5 and abs(a["value"]["width"] - b["value"]["width"]) < 8
        )
