"""RefCOCO / gRefCOCO export read back by REFER-style loaders written here from the format description."""

from __future__ import annotations

import json
import pickle
import pickletools

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from exporters import assign_splits, export_grefcoco, export_refcoco, tokenize
from exporters.synthetic import (
    LABEL_CONFIG,
    brush_result,
    polygon_result,
    random_mask,
    random_polygon,
    text_result,
)
from groundlabel.ls_format import brush_rle_encode, percent_to_pixels

W, H = 80, 60


class Refer:
    """The REFER API's reading rules: refs pickle + instances.json, split matching, getMask."""

    def __init__(self, root, dataset="refcoco", split_by="unc"):
        with open(root / dataset / f"refs({split_by}).p", "rb") as fh:
            self.refs = pickle.load(fh)
        inst = json.loads((root / dataset / "instances.json").read_text())
        self.anns = {a["id"]: a for a in inst["annotations"]}
        self.imgs = {i["id"]: i for i in inst["images"]}
        self.cats = {c["id"]: c["name"] for c in inst["categories"]}
        self.ref_to_ann = {r["ref_id"]: self.anns[r["ann_id"]] for r in self.refs}  # KeyError if dangling
        self.img_to_refs = {}
        for r in self.refs:
            self.img_to_refs.setdefault(r["image_id"], []).append(r)

    def get_ref_ids(self, split):
        if split in ("testA", "testB", "testC"):
            return [r["ref_id"] for r in self.refs if split[-1] in r["split"]]
        if split == "test":
            return [r["ref_id"] for r in self.refs if "test" in r["split"]]
        return [r["ref_id"] for r in self.refs if r["split"] == split]

    def get_mask(self, ref):
        ann = self.ref_to_ann[ref["ref_id"]]
        img = self.imgs[ref["image_id"]]
        seg = ann["segmentation"]
        assert isinstance(seg[0], list) and all(len(p) >= 6 for p in seg)
        rle = mask_utils.frPyObjects(seg, img["height"], img["width"])
        return np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)


def _make_tasks(n=12, seed=0):
    """Tasks with per-region expressions (polygon and brush) and truth masks keyed by sentence."""
    rng = np.random.default_rng(seed)
    tasks, truth = [], {}
    for t in range(n):
        results = []
        for j in range(2):
            if j == 0:
                pts = random_polygon(rng, W, H)
                res = polygon_result(pts, "cat", W, H)
                poly = percent_to_pixels(pts, W, H).reshape(-1).tolist()
                mask = mask_utils.decode(mask_utils.frPyObjects([poly], H, W)[0]).astype(bool)
            else:
                mask = random_mask(rng, W, H)
                res = brush_result(brush_rle_encode(mask), "dog", W, H)
            sentences = [f"Region {t}-{j}, the LEFT one!", f"object {t} {j}"]
            results += [res, text_result("\n".join(sentences), rid=res["id"])]
            for s in sentences:
                truth[s] = mask
        tasks.append(
            {
                "id": t + 1,
                "data": {"image": f"/data/upload/1/img{t}.jpg"},
                "annotations": [{"id": t + 1, "result": results}],
            }
        )
    return tasks, truth


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    tasks, truth = _make_tasks()
    out = tmp_path_factory.mktemp("refcoco")
    summary = export_refcoco(tasks, out, label_config=LABEL_CONFIG, images="none", seed=7)
    return out, truth, summary


def test_refer_loader_maps_every_sentence_to_its_mask(refcoco):
    out, truth, summary = refcoco
    refer = Refer(out)
    assert len(refer.refs) == 24 and summary.exported["sentences"] == 48
    assert not summary.skipped
    for ref in refer.refs:
        assert len(ref["sent_ids"]) == len(ref["sentences"])
        assert [s["sent_id"] for s in ref["sentences"]] == ref["sent_ids"]
        got = refer.get_mask(ref) == 1
        for sent in ref["sentences"]:
            want = truth[sent["raw"]]
            assert (got & want).sum() / (got | want).sum() >= 0.99
            assert sent["tokens"] == tokenize(sent["raw"]) and sent["sent"] == " ".join(sent["tokens"])
        assert refer.cats[ref["category_id"]] in ("cat", "dog")
    assert refer.refs[0]["sentences"][0]["tokens"] == ["region", "0", "0", "the", "left", "one"]


def test_refs_pickle_is_protocol_2_with_plain_types(refcoco):
    out, _, _ = refcoco
    raw = (out / "refcoco" / "refs(unc).p").read_bytes()
    proto = next(arg for op, arg, _ in pickletools.genops(raw) if op.name == "PROTO")
    assert proto == 2
    assert b"numpy" not in raw

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return type(x) in (int, str, bool)

    assert plain(pickle.loads(raw))


def test_splits_by_image_deterministic(refcoco, tmp_path):
    out, _, _ = refcoco
    refer = Refer(out)
    seen = {}
    for split in ("train", "val", "testA", "testB"):
        for rid in refer.get_ref_ids(split):
            image = next(r["image_id"] for r in refer.refs if r["ref_id"] == rid)
            assert seen.setdefault(image, split) == split  # never one image in two splits
    assert set(refer.get_ref_ids("train")) | set(refer.get_ref_ids("val")) | set(
        refer.get_ref_ids("testA")
    ) | set(refer.get_ref_ids("testB")) == {r["ref_id"] for r in refer.refs}
    tasks, _ = _make_tasks()
    export_refcoco(tasks, tmp_path / "again", images="none", seed=7)
    export_refcoco(tasks, tmp_path / "other", images="none", seed=8)
    again = {r["ref_id"]: r["split"] for r in Refer(tmp_path / "again").refs}
    other = {r["ref_id"]: r["split"] for r in Refer(tmp_path / "other").refs}
    assert again == {r["ref_id"]: r["split"] for r in refer.refs}
    assert other != again


def test_assign_splits_fractions_and_stability():
    keys = [f"img{i}" for i in range(4000)]
    splits = assign_splits(keys, "umd", (0.7, 0.2, 0.1), seed=1)
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    assert abs(counts["train"] / 4000 - 0.7) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.02
    more = assign_splits(keys + ["new1", "new2"], "umd", (0.7, 0.2, 0.1), seed=1)
    assert all(more[k] == splits[k] for k in keys)  # a growing project keeps earlier images' splits


def test_umd_layout_and_name(tmp_path):
    tasks, _ = _make_tasks(4)
    export_refcoco(tasks, tmp_path, images="none", split_by="umd", dataset_name="refcocog")
    refs = pickle.loads((tmp_path / "refcocog" / "refs(umd).p").read_bytes())
    assert {r["split"] for r in refs} <= {"train", "val", "test"}


def test_images_land_where_refer_and_lavt_look(tmp_path):
    from PIL import Image

    from exporters import ImageResolver

    root = tmp_path / "media"
    (root / "upload" / "1").mkdir(parents=True)
    for t in range(3):
        Image.new("RGB", (W, H)).save(root / "upload" / "1" / f"img{t}.jpg")
    tasks, _ = _make_tasks(3)
    export_refcoco(tasks, tmp_path / "ref", resolver=ImageResolver(images_root=root))
    export_grefcoco(tasks, tmp_path / "gref", resolver=ImageResolver(images_root=root))
    refer = Refer(tmp_path / "ref")
    for img in refer.imgs.values():
        assert (tmp_path / "ref" / "images" / "mscoco" / "images" / "train2014" / img["file_name"]).is_file()
    inst = json.loads((tmp_path / "gref" / "grefcoco" / "instances.json").read_text())
    for img in inst["images"]:
        assert (tmp_path / "gref" / "images" / "train2014" / img["file_name"]).is_file()


def test_per_task_expressions_refcoco_rules(tmp_path):
    pts = [[[10, 10], [40, 10], [25, 40]], [[50, 50], [90, 50], [70, 90]]]
    one = polygon_result(pts[0], "cat", W, H)
    a, b = polygon_result(pts[0], "cat", W, H), polygon_result(pts[1], "dog", W, H)
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.jpg"},
            "annotations": [{"id": 1, "result": [one, text_result("the cat")]}],
        },
        {
            "id": 2,
            "data": {"image": "b.jpg"},
            "annotations": [{"id": 2, "result": [a, b, text_result("both pets")]}],
        },
        {
            "id": 3,
            "data": {"image": "c.jpg"},
            "annotations": [
                {"id": 3, "result": [{**text_result("a unicorn"), "original_width": W, "original_height": H}]}
            ],
        },
    ]
    summary = export_refcoco(tasks, tmp_path, images="none")
    refs = pickle.loads((tmp_path / "refcoco" / "refs(unc).p").read_bytes())
    assert [(r["image_id"], r["sentences"][0]["raw"]) for r in refs] == [(1, "the cat")]
    assert summary.skipped["per-task expression covers several regions"] == 1
    assert summary.skipped["expression without region (no target)"] == 1
    assert summary.skipped["region without expression"] == 2


class GRefer:
    """gRefCOCO reading rules: list-valued ann_id, Anns[-1] = None, merged masks, empty no-target."""

    def __init__(self, root):
        self.refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
        inst = json.loads((root / "grefcoco" / "instances.json").read_text())
        self.anns = {-1: None, **{a["id"]: a for a in inst["annotations"]}}
        self.imgs = {i["id"]: i for i in inst["images"]}
        self.ref_to_ann = {r["ref_id"]: [self.anns[a] for a in r["ann_id"]] for r in self.refs}

    def get_mask_by_ref(self, ref):
        img = self.imgs[ref["image_id"]]
        if ref["ann_id"] == [-1]:
            return np.zeros((img["height"], img["width"]), np.uint8), True
        total = np.zeros((img["height"], img["width"]), np.uint8)
        for ann in self.ref_to_ann[ref["ref_id"]]:
            rle = mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"])
            total += np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)
        total[total > 1] = 1
        return total, False


def test_grefcoco_multi_and_no_target(tmp_path):
    pts = [[[10, 10], [40, 10], [25, 40]], [[50, 50], [90, 50], [70, 90]]]
    a, b = polygon_result(pts[0], "cat", W, H), polygon_result(pts[1], "dog", W, H)
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.jpg"},
            "annotations": [
                {
                    "id": 1,
                    "result": [
                        a,
                        b,
                        text_result("both pets\nthe two animals"),
                        text_result("the cat", rid=a["id"]),
                    ],
                }
            ],
        },
        {
            "id": 2,
            "data": {"image": "b.jpg"},
            "annotations": [
                {
                    "id": 2,
                    "result": [
                        {**text_result("a flying unicorn"), "original_width": W, "original_height": H}
                    ],
                }
            ],
        },
    ]
    summary = export_grefcoco(tasks, tmp_path, images="none", seed=3)
    refer = GRefer(tmp_path)
    by_text = {r["sentences"][0]["raw"]: r for r in refer.refs}
    assert set(by_text) == {"both pets", "the cat", "a flying unicorn"}
    multi = by_text["both pets"]
    assert len(multi["ann_id"]) == 2 and [s["raw"] for s in multi["sentences"]] == [
        "both pets",
        "the two animals",
    ]
    assert multi["no_target"] is False and len(multi["category_id"]) == 2
    mask, empty = refer.get_mask_by_ref(multi)
    cells = [
        mask_utils.decode(mask_utils.frPyObjects([percent_to_pixels(p, W, H).reshape(-1).tolist()], H, W)[0])
        for p in pts
    ]
    assert not empty and np.array_equal(mask, np.maximum(cells[0], cells[1]))
    single = by_text["the cat"]
    assert len(single["ann_id"]) == 1 and np.array_equal(refer.get_mask_by_ref(single)[0], cells[0])
    none = by_text["a flying unicorn"]
    assert none["ann_id"] == [-1] and none["category_id"] == [-1] and none["no_target"] is True
    mask, empty = refer.get_mask_by_ref(none)
    assert empty and not mask.any()
    assert summary.exported["no-target refs"] == 1 and summary.exported["multi-target refs"] == 1


def test_expression_from_task_data(tmp_path):
    config = LABEL_CONFIG.replace(
        '<TextArea name="expr" toName="image" perRegion="true"/>',
        '<TextArea name="expr" toName="image" value="$expression"/>',
    )
    one = polygon_result([[10, 10], [40, 10], [25, 40]], "cat", W, H)
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.jpg", "expression": "cat on the left"},
            "annotations": [{"id": 1, "result": [one]}],
        }
    ]
    export_refcoco(tasks, tmp_path, images="none", label_config=config)
    refs = pickle.loads((tmp_path / "refcoco" / "refs(unc).p").read_bytes())
    assert refs[0]["sentences"][0]["tokens"] == ["cat", "on", "the", "left"]


def test_tokenize():
    assert tokenize("The man's hat, LEFT-most!") == ["the", "man's", "hat", "left", "most"]
    assert tokenize("  ...  ") == []


def _masks(rng, count):
    """Random masks of every kind the outline tracer meets: noise, blobs, boxes, empty, full, holes."""
    for i in range(count):
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        kind = i % 5
        if kind == 0:
            m = rng.random((h, w)) < rng.random()
        elif kind == 1:
            m = random_mask(rng, w, h)
        elif kind == 2:
            m = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            m[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = True
        elif kind == 3:
            m = np.zeros((h, w), bool) if i % 2 else np.ones((h, w), bool)
        else:
            m = np.ones((h, w), bool)
            m[rng.random((h, w)) < 0.1] = False
        yield m


@pytest.mark.parametrize("tolerance", [0.0, 1.5])
def test_rle_to_polygons_is_mask_to_polygons(tolerance):
    """The export's brush path (RLE painted straight into the upsampled box) gives the polygons of the
    plain one (full decode, row-major copy, crop, upsampling), with counts as bytes or text."""
    from exporters.geometry import mask_to_polygons, rle_to_polygons

    rng = np.random.default_rng(11)
    for m in _masks(rng, 600):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        want = mask_to_polygons(m, tolerance=tolerance)
        assert rle_to_polygons(rle, tolerance=tolerance) == want, m.shape
        text = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        assert rle_to_polygons(text, tolerance=tolerance) == want, m.shape


def test_fill_upsampled_plain_python_matches_compiled():
    """The compiled RLE painter and its plain Python source paint the same pixels."""
    from exporters.geometry import _fill_upsampled

    rng = np.random.default_rng(5)
    for m in _masks(rng, 60):
        if not m.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
        counts = np.frombuffer(rle["counts"], dtype=np.uint8)
        a, b = np.zeros((2 * h, 2 * w), np.uint8), np.zeros((2 * h, 2 * w), np.uint8)
        _fill_upsampled(counts, m.shape[0], x, y, a)
        _fill_upsampled.py_func(counts, m.shape[0], x, y, b)
        assert np.array_equal(a, b)
        crop = m[y : y + h, x : x + w].astype(np.uint8)
        assert np.array_equal(a, np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1))
