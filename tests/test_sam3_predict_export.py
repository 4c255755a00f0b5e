"""``groundlabel predict --engine sam3`` with SAM 3 weights from a local folder, and the COCO export of its
instances: one annotation per instance region."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from sam3_tiny import save_tiny_sam3  # noqa: E402

from exporters import export_coco  # noqa: E402
from groundlabel.ls_format import brush_rle_decode  # noqa: E402
from groundlabel_cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("weights") / "sam3-tiny")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i, size in enumerate([(64, 48), (40, 56)]):
        path = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_with_sam3_then_export_coco(tmp_path, images, sam3_folder, monkeypatch):
    monkeypatch.delenv("GROUNDLABEL_ENGINE", raising=False)
    label_config = tmp_path / "config.xml"
    label_config.write_text(
        '<View><Image name="image" value="$image"/>'
        '<BrushLabels name="brush" toName="image" model_score_threshold="0.0">'
        '<Label value="Car" predicted_values="car,automobile"/><Label value="Dog"/></BrushLabels>'
        '<RectangleLabels name="box" toName="image" model_score_threshold="0.0">'
        '<Label value="Car" predicted_values="car,automobile"/><Label value="Dog"/></RectangleLabels>'
        "</View>",
        encoding="utf-8",
    )
    out = tmp_path / "tasks.json"
    code = main([
        "predict", str(images[0].parent), "--label-config", str(label_config), "--engine", "sam3",
        "--sam3-model", str(sam3_folder), "--device", "cpu", "--batch-size", "2", "--no-progress",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == 2
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "sam3-tiny"
        brush = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        boxes = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        assert len(brush) == len(boxes) >= 2  # one brush mask and one box per instance
        assert len({r["score"] for r in brush}) > 1

    summary = export_coco(tasks, tmp_path / "coco", images="none", include_predictions=True)
    coco = json.loads((tmp_path / "coco" / "instances.json").read_text())
    results = [r for t in tasks for r in t["predictions"][0]["result"]]
    assert summary.exported["annotations"] == len(coco["annotations"]) == len(results)
    by_image = {im["id"]: im for im in coco["images"]}
    brushes = {r["id"]: r for r in results if r["type"] == "brushlabels"}
    matched = 0
    for ann in coco["annotations"]:
        region = brushes.get(ann["labelstudio"]["region_id"])
        if region is None:
            continue
        im = by_image[ann["image_id"]]
        rle = ann["segmentation"]
        if isinstance(rle["counts"], str):
            rle = {**rle, "counts": rle["counts"].encode()}
        exported = mask_utils.decode(rle).astype(bool)
        source = brush_rle_decode(region["value"]["rle"], im["height"], im["width"]) > 0
        assert np.array_equal(exported, source)
        matched += 1
    assert matched == len(brushes)  # every instance is its own annotation
