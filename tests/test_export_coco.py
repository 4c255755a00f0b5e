"""COCO export: pycocotools reads it back, masks match the sources, COCOeval against itself is 1.0."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from exporters import coco_to_labelstudio, export_coco, load_labelstudio_export
from exporters.synthetic import (
    LABEL_CONFIG,
    brush_result,
    polygon_result,
    random_mask,
    random_polygon,
    rectangle_result,
)
from groundlabel.ls_format import brush_rle_encode, percent_to_pixels

W, H = 96, 64


@pytest.fixture(scope="module")
def source():
    """Tasks with polygons, brush masks and rectangles, plus the pixel truth of every region."""
    rng = np.random.default_rng(3)
    truth = {}  # region id -> ("poly", flat pixel polygon) | ("mask", bool mask) | ("box", bbox)
    tasks = []
    for t in range(6):
        results = []
        for j in range(3):
            label = ("cat", "dog", "person")[(t + j) % 3]
            if j == 0:
                pts = random_polygon(rng, W, H)
                res = polygon_result(pts, label, W, H)
                truth[res["id"]] = ("poly", percent_to_pixels(pts, W, H).reshape(-1).tolist(), label)
            elif j == 1:
                mask = random_mask(rng, W, H)
                res = brush_result(brush_rle_encode(mask), label, W, H)
                truth[res["id"]] = ("mask", mask, label)
            else:
                x, y, w, h = 10.0 + t, 20.0, 30.5, 25.25
                res = rectangle_result(x, y, w, h, label, W, H)
                truth[res["id"]] = ("box", [x * W / 100, y * H / 100, w * W / 100, h * H / 100], label)
            results.append(res)
        tasks.append(
            {
                "id": 100 + t,
                "data": {"image": f"/data/local-files/?d=pics/img{t}.png"},
                "annotations": [
                    {
                        "id": 500 + t,
                        "result": results,
                        "was_cancelled": False,
                        "updated_at": "2024-05-01T10:00:00Z",
                    }
                ],
            }
        )
    return tasks, truth


def _load(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_coco_masks_and_measures_match_sources(source, tmp_path):
    tasks, truth = source
    summary = export_coco(tasks, tmp_path, label_config=LABEL_CONFIG, images="none")
    assert not summary.skipped
    coco = _load(tmp_path / "instances.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "person"]
    assert sorted(coco.getImgIds()) == [100 + t for t in range(6)]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 18
    for ann in anns:
        kind, ref, label = truth[ann["labelstudio"]["region_id"]]
        assert coco.loadCats(ann["category_id"])[0]["name"] == label
        got = coco.annToMask(ann).astype(bool)
        if kind == "mask":
            inter, union = (got & ref).sum(), (got | ref).sum()
            assert inter / union >= 0.99
            assert isinstance(ann["segmentation"], dict) and ann["iscrowd"] == 0
        elif kind == "poly":
            expected = mask_utils.decode(mask_utils.frPyObjects([ref], H, W)[0]).astype(bool)
            assert np.array_equal(got, expected)
        else:
            assert ann["bbox"] == pytest.approx(ref, abs=1e-3)
            assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) == 8
        rle = mask_utils.encode(np.asfortranarray(got.astype(np.uint8)))
        assert ann["area"] == int(mask_utils.area(rle))
        if kind != "box":
            assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist(), abs=1e-3)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_cocoeval_against_itself_is_perfect(source, tmp_path, iou_type):
    tasks, _ = source
    export_coco(tasks, tmp_path, label_config=LABEL_CONFIG, images="none")
    gt = _load(tmp_path / "instances.json")
    dets = []
    for ann in gt.loadAnns(gt.getAnnIds()):
        det = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if iou_type == "segm":
            det["segmentation"] = gt.annToRLE(ann)
        else:
            det["bbox"] = ann["bbox"]
        dets.append(det)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_brush_as_polygons(source, tmp_path):
    tasks, truth = source
    export_coco(tasks, tmp_path, label_config=LABEL_CONFIG, images="none", brush_format="polygon")
    coco = _load(tmp_path / "instances.json")
    for ann in coco.loadAnns(coco.getAnnIds()):
        kind, ref, _ = truth[ann["labelstudio"]["region_id"]]
        assert isinstance(ann["segmentation"], list)
        if kind == "mask":
            got = coco.annToMask(ann).astype(bool)
            assert (got & ref).sum() / (got | ref).sum() >= 0.99


def test_categories_without_config_sorted_by_name(tmp_path):
    pts = [[10, 10], [50, 10], [30, 40]]
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.png"},
            "annotations": [
                {"id": 1, "result": [polygon_result(pts, "zebra", W, H), polygon_result(pts, "ant", W, H)]}
            ],
        }
    ]
    export_coco(tasks, tmp_path, images="none")
    data = json.loads((tmp_path / "instances.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "ant"), (2, "zebra")]


def _task_with(annotations, predictions=()):
    return {
        "id": 7,
        "data": {"image": "x.png"},
        "annotations": list(annotations),
        "predictions": list(predictions),
    }


def _ann(aid, label, updated, **extra):
    pts = [[10, 10], [60, 10], [30, 50]]
    return {"id": aid, "updated_at": updated, "result": [polygon_result(pts, label, W, H)], **extra}


@pytest.mark.parametrize(
    ("mode", "preds", "expected"),
    [
        ("latest", False, ["dog"]),
        ("ground-truth", False, ["cat"]),
        ("all", False, ["cat", "dog"]),
        ("all", True, ["cat", "dog", "person"]),
    ],
)
def test_which_annotation_wins(tmp_path, mode, preds, expected):
    task = _task_with(
        [
            _ann(1, "cat", "2024-01-01T00:00:00Z", ground_truth=True),
            _ann(2, "dog", "2024-02-01T00:00:00Z"),
            _ann(3, "bird", "2024-03-01T00:00:00Z", was_cancelled=True),
        ],
        [_ann(9, "person", "2024-04-01T00:00:00Z")],
    )
    summary = export_coco([task], tmp_path, images="none", annotations=mode, include_predictions=preds)
    data = json.loads((tmp_path / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(names[a["category_id"]] for a in data["annotations"]) == expected
    assert summary.skipped["cancelled annotation"] == 1


def test_predictions_fill_in_only_without_annotations(tmp_path):
    tasks = [
        _task_with([], [_ann(9, "person", "2024-04-01T00:00:00Z")]),
    ]
    summary = export_coco(tasks, tmp_path / "a", images="none")
    assert summary.skipped["task without annotation"] == 1
    summary = export_coco(tasks, tmp_path / "b", images="none", include_predictions=True)
    assert summary.exported["annotations"] == 1


def test_images_copied_and_linked_from_local_files(tmp_path):
    root = tmp_path / "root"
    (root / "pics").mkdir(parents=True)
    Image.new("RGB", (W, H), "red").save(root / "pics" / "a.png")
    pts = [[10, 10], [60, 10], [30, 50]]
    res = polygon_result(pts, "cat", W, H)
    del res["original_width"], res["original_height"]  # the size must come from the file
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=pics/a.png"},
            "annotations": [{"id": 1, "result": [res]}],
        },
        {
            "id": 2,
            "data": {"image": "/data/local-files/?d=pics/missing.png"},
            "annotations": [{"id": 2, "result": [polygon_result(pts, "cat", W, H)]}],
        },
    ]
    from exporters import ImageResolver

    for mode in ("copy", "link"):
        out = tmp_path / mode
        summary = export_coco(tasks, out, images=mode, resolver=ImageResolver(images_root=root))
        data = json.loads((out / "instances.json").read_text())
        assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [("a.png", W, H)]
        placed = out / "images" / "a.png"
        assert placed.is_file() and placed.is_symlink() == (mode == "link")
        assert summary.skipped["image not found"] == 1
        assert "missing.png" in summary.examples["image not found"][0]
        assert (
            json.loads((out / "export_summary.json").read_text())["skipped"]["image not found"]["count"] == 1
        )


def _by_file(coco):
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    out = {}
    for a in coco["annotations"]:
        out.setdefault(files[a["image_id"]], []).append(a)
    for anns in out.values():
        anns.sort(key=lambda a: a["labelstudio"]["region_id"])
    return out, cats, {i["file_name"]: i for i in coco["images"]}


def test_round_trip_labelstudio_coco_labelstudio_coco(source, tmp_path):
    tasks, _ = source
    export_coco(tasks, tmp_path / "one", label_config=LABEL_CONFIG, images="none")
    first = json.loads((tmp_path / "one" / "instances.json").read_text())
    imported = coco_to_labelstudio(first, label_config=LABEL_CONFIG)
    assert all("predictions" in t and t["predictions"][0]["model_version"] for t in imported)
    path = tmp_path / "import.json"
    path.write_text(json.dumps(imported))
    export_coco(
        load_labelstudio_export(path),
        tmp_path / "two",
        label_config=LABEL_CONFIG,
        images="none",
        include_predictions=True,
    )
    second = json.loads((tmp_path / "two" / "instances.json").read_text())
    a, cats_a, imgs_a = _by_file(first)
    b, cats_b, imgs_b = _by_file(second)
    assert cats_a == cats_b and a.keys() == b.keys()
    for name in a:
        assert (imgs_a[name]["width"], imgs_a[name]["height"]) == (
            imgs_b[name]["width"],
            imgs_b[name]["height"],
        )
        assert imgs_a[name]["labelstudio"]["image"] == imgs_b[name]["labelstudio"]["image"]
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name], strict=True):
            assert x["category_id"] == y["category_id"]
            assert x["labelstudio"]["type"] == y["labelstudio"]["type"]
            assert x["iscrowd"] == y["iscrowd"]
            assert x["bbox"] == pytest.approx(y["bbox"], abs=0.01)
            if isinstance(x["segmentation"], dict):
                assert x["segmentation"] == y["segmentation"] and x["area"] == y["area"]
            else:
                assert np.allclose(x["segmentation"][0], y["segmentation"][0], atol=0.01)
                ma = mask_utils.decode(
                    mask_utils.frPyObjects(x["segmentation"], imgs_a[name]["height"], imgs_a[name]["width"])
                ).any(axis=2)
                mb = mask_utils.decode(
                    mask_utils.frPyObjects(y["segmentation"], imgs_b[name]["height"], imgs_b[name]["width"])
                ).any(axis=2)
                assert (ma & mb).sum() / (ma | mb).sum() >= 0.99
                assert abs(x["area"] - y["area"]) <= 0.01 * x["area"] + 2


def test_rotated_rectangle_round_trip():
    from exporters.coco import _rectangle_value
    from exporters.geometry import rectangle_from_percent

    value = {"x": 20.0, "y": 30.0, "width": 25.0, "height": 10.0, "rotation": 30.0}
    bbox, poly = rectangle_from_percent(value, 200, 100)
    back = _rectangle_value(poly, 200, 100)
    assert back == pytest.approx(value, abs=1e-3)
    # the axis-aligned box around a 50x10 px box turned by 30 degrees about its top-left corner (40, 30)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    assert bbox == pytest.approx([40 - 10 * s, 30, 50 * c + 10 * s, 50 * s + 10 * c], abs=1e-3)


def _random_json(rng, depth=0):
    k = rng.integers(8 if depth < 3 else 5)
    if k == 0:  # floats of every size, the exponent forms and NaN/inf included
        choice = rng.integers(4)
        if choice == 0:
            return round(float(rng.uniform(-1000, 1000)), int(rng.integers(0, 4)))
        if choice == 1:
            return float(rng.choice([-1, 1]) * 10 ** rng.uniform(-320, 308))
        if choice == 2:
            return float(rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-5, 1e16]))
        return float(np.frombuffer(rng.bytes(8), np.float64)[0])
    if k == 1:
        return int(rng.choice([rng.integers(-1000, 1000), rng.integers(-(2**62), 2**62)])) * int(
            rng.choice([1, 1, 2**10])
        )
    if k == 2:  # ASCII, control characters, DEL, accents, CJK, astral
        ranges = [(0, 0x80), (0x7F, 0x800), (0x800, 0xD800), (0x10000, 0x110000)]
        return "".join(
            chr(int(rng.integers(*ranges[int(rng.integers(4))]))) for _ in range(int(rng.integers(0, 8)))
        )
    if k == 3:
        return [True, False, None][int(rng.integers(3))]
    if k == 4:
        return float(rng.random())
    if k == 5:
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(4)))]
    if k == 6:
        return {str(_random_json(rng, 3)): _random_json(rng, depth + 1) for _ in range(int(rng.integers(4)))}
    return tuple(_random_json(rng, depth + 1) for _ in range(int(rng.integers(3))))


def test_dumps_compact_is_json_dumps():
    """instances.json's writer (orjson where it writes the same text) gives json.dumps' text exactly."""
    from exporters.steps import dumps_compact

    rng = np.random.default_rng(3)
    docs = [_random_json(rng) for _ in range(4000)]
    docs += [{"a": [_random_json(rng, 3) for _ in range(50)]} for _ in range(500)]
    docs += [{"file_name": "image-1e-5.jpg", "bbox": [0.5, 1e-05]}, {"x": 2**64}, {1: 2}, 7, "s"]
    for doc in docs:
        assert dumps_compact(doc) == json.dumps(doc, separators=(",", ":")), doc
