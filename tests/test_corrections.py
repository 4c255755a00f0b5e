"""The measuring core (groundlabel/corrections.py) against independent computations.

Masks are rasterised here the way COCO tools do (pycocotools' ``frPyObjects`` for polygons and rectangles,
label-studio-sdk's own ``decode_rle`` for brush masks) and compared with pycocotools' ``iou``; the boundary F
measure with a brute-force distance computation; the kept / edited / deleted / added counts with what each
test did to the prediction.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from exporters.synthetic import brush_result, polygon_result, random_mask, random_polygon, rectangle_result
from groundlabel import corrections
from groundlabel.corrections import (
    boundary_f,
    box_iou,
    compare,
    latest_annotation,
    mask_iou,
    measure_task,
    polygon_mask,
    started_from,
    summarise,
)
from groundlabel.ls_format import brush_rle_decode, brush_rle_encode
from groundlabel.versions import engine_of

mask_utils = pytest.importorskip("pycocotools.mask")

W, H = 96, 72


# -- independent references ------------------------------------------------------------------------


def coco_polygon(points_percent: list[list[float]], width: int = W, height: int = H) -> np.ndarray:
    flat = [v for x, y in points_percent for v in (x * width / 100, y * height / 100)]
    return mask_utils.decode(mask_utils.frPyObjects([flat], height, width))[:, :, 0].astype(bool)


def sdk_brush(result: dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    ra = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    rb = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
    return float(mask_utils.iou([ra], [rb], [0])[0, 0])


def brute_boundary_f(a: np.ndarray, b: np.ndarray, tol: float = 2) -> float:
    def edge(m: np.ndarray) -> np.ndarray:
        p = np.pad(m, 1)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner)

    ea, eb = edge(a), edge(b)
    if not len(ea) or not len(eb):
        return 0.0
    d = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    precision = (d.min(axis=1) <= tol).mean()
    recall = (d.min(axis=0) <= tol).mean()
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# -- rasterising -------------------------------------------------------------------------------------


def test_polygons_are_rasterised_pixel_for_pixel_as_pycocotools_does() -> None:
    rng = np.random.default_rng(0)
    for n in range(600):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        k = int(rng.integers(3, 12))
        if n % 3 == 0:  # points outside the image
            pts = rng.uniform(-10, max(h, w) + 10, (k, 2))
        elif n % 3 == 1:  # whole pixels, a repeated point
            pts = rng.integers(0, max(h, w), (k, 2)).astype(float)
            pts[1] = pts[0]
        else:
            pts = rng.uniform(0, 1, (k, 2)) * [w, h]
        ref = mask_utils.decode(mask_utils.frPyObjects([pts.reshape(-1).tolist()], h, w))[:, :, 0]
        np.testing.assert_array_equal(polygon_mask(pts, h, w), ref.astype(bool), err_msg=f"case {n}")
    assert not polygon_mask([[1, 1], [5, 5]], 8, 8).any()  # two points: no polygon


def test_brush_masks_decode_the_same_without_numba(monkeypatch) -> None:
    """Where numba is missing (the backend's base install), label-studio-sdk's decoder gives the same mask."""
    import groundlabel.ls_format as ls_format

    rng = np.random.default_rng(1)
    mask = random_mask(rng, W, H)
    rle = brush_rle_encode(mask)
    compiled = brush_rle_decode(rle, H, W)
    monkeypatch.setattr(ls_format, "numba_available", lambda: False)
    fallback = brush_rle_decode(rle, H, W)
    np.testing.assert_array_equal(fallback, mask)
    np.testing.assert_array_equal(fallback, compiled)
    assert fallback.flags.f_contiguous
    with pytest.raises(corrections.UserError, match="pixels but the image"):
        brush_rle_decode(rle, H, W + 1)


def test_rectangle_masks_are_the_coco_export_polygons() -> None:
    from exporters.geometry import rectangle_from_percent

    for rotation in (0.0, 17.0, 90.0):
        value = {"x": 10.5, "y": 20.25, "width": 30.0, "height": 25.0, "rotation": rotation}
        _, poly = rectangle_from_percent(value, W, H)
        region = corrections.read_regions(
            [
                rectangle_result(
                    **{k: value[k] for k in ("x", "y")},
                    w=30.0,
                    h=25.0,
                    label="A",
                    width=W,
                    height=H,
                    rotation=rotation,
                )
            ]
        )[0]
        ref = mask_utils.decode(mask_utils.frPyObjects([poly], H, W))[:, :, 0].astype(bool)
        np.testing.assert_array_equal(corrections.region_mask(region, H, W), ref)


# -- measures of two masks and two boxes -------------------------------------------------------------


def test_mask_iou_and_boundary_f_equal_independent_computations() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = random_mask(rng, W, H), random_mask(rng, W, H)
        b |= np.roll(a, int(rng.integers(-4, 5)), axis=1)  # overlapping, some of it near
        assert mask_iou(a, b) == pytest.approx(coco_iou(a, b), abs=1e-12)
        assert boundary_f(a, b) == pytest.approx(brute_boundary_f(a, b), abs=1e-12)
    a = random_mask(rng, W, H)
    assert mask_iou(a, a) == 1.0 and boundary_f(a, a) == 1.0
    shifted = np.roll(a, 2, axis=1)  # every boundary pixel within 2 px of the other's
    assert boundary_f(a, shifted) == 1.0 and mask_iou(a, shifted) < 1.0
    empty = np.zeros_like(a)
    assert mask_iou(empty, empty) is None and boundary_f(empty, empty) is None
    assert mask_iou(a, empty) == 0.0 and boundary_f(a, empty) == 0.0


def test_box_iou_equals_pycocotools() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        a = sorted(rng.uniform(0, 50, 2)), sorted(rng.uniform(0, 50, 2))
        b = sorted(rng.uniform(0, 50, 2)), sorted(rng.uniform(0, 50, 2))
        box_a = (a[0][0], a[1][0], a[0][1], a[1][1])
        box_b = (b[0][0], b[1][0], b[0][1], b[1][1])
        xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (box_a, box_b)]
        ref = mask_utils.iou([xywh[0]], [xywh[1]], [0])[0, 0]
        assert box_iou(box_a, box_b) == pytest.approx(ref, abs=1e-12)


# -- pairs -------------------------------------------------------------------------------------------


def test_the_latest_submitted_annotation_and_the_prediction_it_started_from() -> None:
    task = {
        "id": 5,
        "annotations": [
            {
                "id": 1,
                "result": [],
                "updated_at": "2024-03-01T10:00:00Z",
                "created_at": "2024-03-01T10:00:00Z",
            },
            {
                "id": 2,
                "result": [],
                "updated_at": "2024-03-02T10:00:00Z",
                "created_at": "2024-03-02T09:00:00Z",
            },
            {"id": 3, "result": [], "was_cancelled": True, "updated_at": "2024-03-03T10:00:00Z"},
        ],
        "predictions": [
            {"id": 7, "model_version": "gem-a", "created_at": "2024-02-01T00:00:00Z", "result": []},
            {"id": 8, "model_version": "gem-b", "created_at": "2024-03-01T12:00:00Z", "result": []},
            {"id": 9, "model_version": "gem-c", "created_at": "2024-04-01T00:00:00Z", "result": []},
        ],
    }
    annotation = latest_annotation(task)
    assert annotation["id"] == 2  # the cancelled one never counts
    assert started_from(task, annotation)["id"] == 8  # the latest before it; gem-c came after
    assert started_from(task, {**annotation, "parent_prediction": 7})["id"] == 7
    assert started_from(task, {"created_at": "2024-01-01T00:00:00Z"}) is None  # before every prediction
    assert latest_annotation({"annotations": [task["annotations"][2]]}) is None
    assert measure_task({"id": 1, "annotations": []}) is None


def test_engine_names() -> None:
    assert engine_of("gem-ViT-B-16-openai-cfg1a2b") == "gem"
    assert engine_of("gem-ViT-B-16-openai+sam-tiny-cfg1a2b") == "gem+sam"
    assert engine_of("lavt-tiny-p7-v2") == "lavt"
    assert engine_of("sam3-random+sam3-random") == "sam3"


# -- region changes ----------------------------------------------------------------------------------


def scene(rng: np.random.Generator) -> dict:
    """A prediction with brush, polygon, rectangle and key point regions, and an annotation made from it:
    some regions kept, some edited, one deleted, one added; and what was done to each."""
    m1, m2, m3 = (random_mask(rng, W, H) for _ in range(3))
    p1, p2 = random_polygon(rng, W, H), random_polygon(rng, W, H)
    predicted = [
        brush_result(brush_rle_encode(m1), "Cat", W, H, rid="b1", from_name="mask"),  # kept
        brush_result(brush_rle_encode(m2), "Cat", W, H, rid="b2", from_name="mask"),  # edited (pixels)
        brush_result(brush_rle_encode(m3), "Dog", W, H, rid="b3", from_name="mask"),  # deleted
        polygon_result(p1, "Cat", W, H, rid="p1"),  # kept
        polygon_result(p2, "Dog", W, H, rid="p2"),  # relabelled: edited
        rectangle_result(10, 10, 30, 30, "Cat", W, H, rid="r1"),  # moved: edited
        {
            "id": "k1",
            "from_name": "pt",
            "to_name": "image",
            "type": "keypointlabels",
            "original_width": W,
            "original_height": H,
            "value": {"x": 50.0, "y": 50.0, "width": 1.0, "keypointlabels": ["Cat"]},
        },  # moved a little: edited
    ]
    annotated = copy.deepcopy(
        [predicted[0], predicted[1], predicted[3], predicted[4], predicted[5], predicted[6]]
    )
    grown = m2 | np.roll(m2, 3, axis=0)
    annotated[1]["value"]["rle"] = brush_rle_encode(grown)
    annotated[3]["value"]["polygonlabels"] = ["Cat"]
    annotated[4]["value"]["x"] = 12.0
    annotated[5]["value"]["x"] = 52.0
    added = random_mask(rng, W, H)
    annotated.append(brush_result(brush_rle_encode(added), "Dog", W, H, rid="new", from_name="mask"))
    return {"predicted": predicted, "annotated": annotated}


def test_kept_edited_deleted_and_added_regions() -> None:
    s = scene(np.random.default_rng(4))
    labels, regions, errors = compare(s["predicted"], s["annotated"], W, H)
    assert errors == []
    by_id = {(r.predicted_id or r.annotated_id): r for r in regions}
    assert {k: r.change for k, r in by_id.items()} == {
        "b1": "kept",
        "b2": "edited",
        "b3": "deleted",
        "new": "added",
        "p1": "kept",
        "p2": "edited",
        "r1": "edited",
        "k1": "edited",
    }
    assert all(r.matched_by == "id" for r in regions if r.change in ("kept", "edited"))
    assert by_id["p2"].label == "Cat" and by_id["p2"].predicted_label == "Dog"
    assert by_id["k1"].distance == pytest.approx(0.02 * W)
    pred_box = [0.1 * W, 0.1 * H, 0.3 * W, 0.3 * H]
    ann_box = [0.12 * W, 0.1 * H, 0.3 * W, 0.3 * H]
    assert by_id["r1"].iou == pytest.approx(mask_utils.iou([ann_box], [pred_box], [0])[0, 0], abs=1e-12)
    # without the ids, the regions are matched by overlap, with the same outcome
    stripped = copy.deepcopy(s["annotated"])
    for n, r in enumerate(stripped):
        r["id"] = f"other{n}"
    by_overlap_labels, by_overlap, _ = compare(s["predicted"], stripped, W, H)
    assert sorted(r.change for r in by_overlap) == sorted(r.change for r in regions)
    # the kept regions were not read with their ids; read, they give the same figures
    assert [(m.control, m.label, m.iou, m.boundary_f) for m in by_overlap_labels] == [
        (m.control, m.label, m.iou, m.boundary_f) for m in labels
    ]
    assert all(r.matched_by == "overlap" for r in by_overlap if r.change in ("kept", "edited"))


def test_label_measures_equal_pycocotools_on_the_same_pairs() -> None:
    s = scene(np.random.default_rng(5))
    labels, _, _ = compare(s["predicted"], s["annotated"], W, H)

    def union(results: list[dict], control: str, label: str) -> np.ndarray:
        out = np.zeros((H, W), bool)
        for r in results:
            if r["from_name"] != control or r["value"].get(r["type"]) != [label]:
                continue
            out |= sdk_brush(r) if r["type"] == "brushlabels" else coco_polygon(r["value"]["points"])
        return out

    got = {(m.control, m.label): m for m in labels}
    assert set(got) == {("mask", "Cat"), ("mask", "Dog"), ("poly", "Cat"), ("poly", "Dog")}
    for (control, label), m in got.items():
        a, b = union(s["predicted"], control, label), union(s["annotated"], control, label)
        assert m.iou == pytest.approx(coco_iou(a, b), abs=1e-12), (control, label)
        assert m.boundary_f == pytest.approx(brute_boundary_f(a, b), abs=1e-12)
        assert not m.unchanged  # every label has a changed region
    assert got[("poly", "Dog")].iou == 0.0  # relabelled away: none of the Dog polygon is left
    masks = corrections.label_masks(corrections.read_regions(s["predicted"]), H, W)
    assert sorted(masks) == [("mask", "Cat"), ("mask", "Dog"), ("poly", "Cat"), ("poly", "Dog")]
    for (control, label), m in masks.items():
        np.testing.assert_array_equal(m, union(s["predicted"], control, label))
    # an annotation submitted as predicted: every label unchanged, every region kept, no pixel read
    labels, regions, _ = compare(s["predicted"], copy.deepcopy(s["predicted"]), W, H)
    assert all(m.unchanged and m.iou == m.boundary_f == 1.0 for m in labels) and len(labels) == 4
    assert [r.change for r in regions] == ["kept"] * len(s["predicted"])


def test_summary_adds_up_per_version_and_label() -> None:
    rng = np.random.default_rng(6)
    tasks = []
    for n, version in enumerate(["gem-a-cfg1", "gem-a-cfg1", "lavt-b+sam-c"]):
        s = scene(rng)
        tasks.append(
            {
                "id": n + 1,
                "predictions": [{"id": 10 + n, "model_version": version, "result": s["predicted"]}],
                "annotations": [
                    {
                        "id": 20 + n,
                        "result": s["annotated"],
                        "lead_time": 10.0 * (n + 1),
                        "parent_prediction": 10 + n,
                    }
                ],
            }
        )
    tasks.append({"id": 9, "predictions": [], "annotations": [{"id": 29, "result": [], "lead_time": 100.0}]})
    measures = [measure_task(t) for t in tasks]
    assert [m.engine for m in measures] == ["gem", "gem", "lavt+sam", None]
    summary = summarise(measures)
    versions = {v["model_version"]: v for v in summary["versions"]}
    assert versions["gem-a-cfg1"]["tasks"] == 2 and versions["gem-a-cfg1"]["lead_time_mean"] == 15.0
    assert versions["none"]["lead_time_mean"] == 100.0 and versions["none"]["tasks"] == 1
    assert versions["gem-a-cfg1"]["kept"] == 4 and versions["gem-a-cfg1"]["deleted"] == 2
    rows = {(g["model_version"], g["control"], g["label"]): g for g in summary["groups"]}
    cat = rows[("gem-a-cfg1", "mask", "Cat")]
    assert (cat["kept"], cat["edited"], cat["deleted"], cat["added"]) == (2, 2, 0, 0)
    assert cat["kept_rate"] == 0.5 and cat["kind"] == "brush"
    ious = [lm.iou for m in measures[:2] for lm in m.labels if (lm.control, lm.label) == ("mask", "Cat")]
    assert cat["ious"] == ious and cat["mask_iou_mean"] == pytest.approx(sum(ious) / 2)
    boxes = [r.iou for m in measures[:2] for r in m.regions if r.kind == "rectangle"]
    assert rows[("gem-a-cfg1", "box", "Cat")]["box_iou_mean"] == pytest.approx(sum(boxes) / 2)
    points = [r.distance for m in measures[:2] for r in m.regions if r.kind == "keypoint"]
    assert rows[("gem-a-cfg1", "pt", "Cat")]["point_distance_mean"] == pytest.approx(sum(points) / 2)
