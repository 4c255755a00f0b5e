"""Bad input gives a clear reason (in the summary or as a UserError), never a crash or a silent drop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporters import export_coco, export_refcoco, load_labelstudio_export
from exporters.synthetic import LABEL_CONFIG, brush_result, polygon_result, rectangle_result, text_result
from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_encode
from groundlabel_cli import main as cli

W, H = 40, 30
TRI = [[10, 10], [60, 10], [30, 60]]


def _export(results, tmp_path, **kw):
    tasks = [{"id": 1, "data": {"image": "a.png"}, "annotations": [{"id": 1, "result": results}]}]
    return export_coco(tasks, tmp_path, images="none", **kw)


def test_truncated_json(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"id": 1, "data": {"image": "a.png"}, "annotations": []}])[:-7])
    with pytest.raises(UserError, match="not valid JSON.*truncated"):
        load_labelstudio_export(path)


def test_json_min_export_is_refused_with_reason(tmp_path):
    path = tmp_path / "min.json"
    path.write_text(json.dumps([{"id": 1, "image": "a.png", "data": {"image": "a.png"}, "label": []}]))
    with pytest.raises(UserError, match="JSON_MIN"):
        load_labelstudio_export(path)
    path.write_text(json.dumps({"tasks": 3}))
    with pytest.raises(UserError, match="list of tasks"):
        load_labelstudio_export(path)


def test_unknown_control_and_region_type(tmp_path):
    ellipse = {
        "id": "e1",
        "from_name": "ell",
        "to_name": "image",
        "type": "ellipselabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": 1, "y": 1, "radiusX": 3, "radiusY": 3, "ellipselabels": ["cat"]},
    }
    stray = polygon_result(TRI, "cat", W, H, from_name="other_tool")
    keypoint = {
        "id": "k1",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": 1, "y": 1, "keypointlabels": ["cat"]},
    }
    choice = {
        "id": "c1",
        "from_name": "q",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["ok"]},
    }
    ok = polygon_result(TRI, "cat", W, H)
    summary = _export([ellipse, stray, keypoint, choice, ok], tmp_path, label_config=LABEL_CONFIG)
    assert summary.skipped["unknown region type"] == 1
    assert "ellipselabels" in summary.examples["unknown region type"][0]
    assert summary.skipped["control not in the label config"] == 1
    assert summary.skipped["keypoint region (not an instance)"] == 1
    assert summary.skipped["result is not a region"] == 1
    assert summary.exported["annotations"] == 1


def test_region_without_label_and_unknown_label(tmp_path):
    nolabel = polygon_result(TRI, "cat", W, H)
    nolabel["value"]["polygonlabels"] = []
    unknown = polygon_result(TRI, "giraffe", W, H)
    summary = _export([nolabel, unknown], tmp_path, label_config=LABEL_CONFIG)
    assert summary.skipped["region without label"] == 1
    assert summary.skipped["label not in the label config"] == 1
    assert summary.exported["annotations"] == 0


def test_plain_region_takes_label_from_labels_result(tmp_path):
    poly = polygon_result(TRI, "cat", W, H)
    poly["type"] = "polygon"
    del poly["value"]["polygonlabels"]
    labels = {
        "id": poly["id"],
        "from_name": "lab",
        "to_name": "image",
        "type": "labels",
        "value": {**poly["value"], "labels": ["dog"]},
    }
    summary = _export([poly, labels], tmp_path)
    data = json.loads((tmp_path / "instances.json").read_text())
    assert summary.exported["annotations"] == 1 and data["categories"][0]["name"] == "dog"


def test_degenerate_polygons(tmp_path):
    two = polygon_result([[10, 10], [50, 50]], "cat", W, H)
    line = polygon_result([[10, 10], [20, 20], [30, 30]], "cat", W, H)
    same = polygon_result([[10, 10], [10, 10], [10, 10], [20, 20]], "cat", W, H)
    junk = polygon_result([["a", 1], [2, 3], [4, 5]], "cat", W, H)
    sliver = polygon_result([[10, 10], [10.1, 10], [10.05, 10.01]], "cat", W, H)  # area but no pixel
    flat = rectangle_result(10, 10, 0, 5, "cat", W, H)
    summary = _export([two, line, same, junk, sliver, flat], tmp_path)
    assert summary.skipped["degenerate polygon"] == 5
    assert summary.skipped["empty mask"] == 1
    assert summary.exported["annotations"] == 0
    assert any("zero area" in e for e in summary.examples["degenerate polygon"])


def test_brush_rle_of_wrong_size_and_corrupt(tmp_path):
    mask = np.zeros((H + 2, W), bool)
    mask[3:9, 4:12] = True
    wrong = brush_result(brush_rle_encode(mask), "cat", W, H)  # claims WxH, holds W x (H+2)
    corrupt = brush_result([1, 2, 3], "cat", W, H)
    empty = brush_result(brush_rle_encode(np.zeros((H, W), bool)), "cat", W, H)
    summary = _export([wrong, corrupt, empty], tmp_path)
    assert summary.skipped["brush RLE size mismatch"] == 2
    assert any(f"{W}x{H}" in e for e in summary.examples["brush RLE size mismatch"])
    assert summary.skipped["empty mask"] == 1


def test_image_missing_and_no_image_field(tmp_path):
    tasks = [
        {
            "id": 1,
            "data": {"image": "nowhere/a.png"},
            "annotations": [{"id": 1, "result": [polygon_result(TRI, "cat", W, H)]}],
        },
        {
            "id": 2,
            "data": {"a": "x.png", "b": "y.png"},
            "annotations": [{"id": 2, "result": [polygon_result(TRI, "cat", W, H)]}],
        },
        {
            "id": 3,
            "data": {"image": "nowhere/c.png"},
            "annotations": [{"id": 3, "result": [text_result("hi")]}],
        },
    ]
    summary = export_coco(tasks, tmp_path, images="copy")
    assert summary.skipped["image not found"] == 2
    assert summary.skipped["image size unknown"] == 1
    assert summary.exported["images"] == 0


def test_expression_on_a_skipped_region(tmp_path):
    bad = polygon_result([[10, 10], [50, 50]], "cat", W, H)
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.png"},
            "annotations": [
                {"id": 1, "result": [bad, text_result("the cat", rid=bad["id"]), text_result("also the cat")]}
            ],
        }
    ]
    summary = export_refcoco(tasks, tmp_path, images="none")
    assert summary.skipped["expression on a skipped region"] == 2
    assert summary.exported["refs"] == 0


def test_cli_export_and_errors(tmp_path, capsys):
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.png"},
            "annotations": [{"id": 1, "result": [polygon_result(TRI, "cat", W, H)]}],
        }
    ]
    src = tmp_path / "export.json"
    src.write_text(json.dumps(tasks))
    out = tmp_path / "out"
    assert (
        cli.main(["export", str(src), "--format", "coco", "--out", str(out), "--images", "none", "-q"]) == 0
    )
    assert "annotations" in capsys.readouterr().out
    assert json.loads((out / "export_summary.json").read_text())["exported"]["annotations"] == 1
    assert (
        cli.main(
            ["export", str(out / "instances.json"), "--format", "labelstudio", "--out", str(tmp_path / "ls")]
        )
        == 0
    )
    back = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert back[0]["predictions"][0]["result"][0]["type"] == "polygonlabels"
    assert (
        cli.main(
            [
                "export",
                str(src),
                "--format",
                "refcoco",
                "--out",
                str(tmp_path / "r"),
                "--images",
                "none",
                "--split-fractions",
                "1,0",
            ]
        )
        == 2
    )
    assert "needs 4 numbers" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("[{")
    assert cli.main(["export", str(tmp_path / "broken.json"), "--out", str(tmp_path / "x")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert cli.main(["export", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--help"])
    assert exc.value.code == 0
    assert "refs(unc|umd).p" in capsys.readouterr().out


def test_project_without_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert cli.main(["export", "--project", "3", "--out", str(tmp_path)]) == 2
    assert "--project needs --url and --api-key" in capsys.readouterr().err
