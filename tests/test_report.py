"""``groundlabel report`` on Label Studio JSON exports: the figures, the JSON, the table and the HTML page.

The export is generated (:func:`exporters.synthetic.make_corrected_export`): pre-labelled tasks whose
annotations kept, edited, deleted and added known regions. The mask IoUs are checked against pycocotools
(polygons rasterised by ``frPyObjects``, brush masks decoded by label-studio-sdk, ``mask.iou``), computed
here from the export itself.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from exporters.synthetic import make_corrected_export
from groundlabel_cli import report as report_cli
from groundlabel_cli.main import main

mask_utils = pytest.importorskip("pycocotools.mask")

W, H = 160, 120


def _mask(result: dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    w, h = result["original_width"], result["original_height"]
    if result["type"] == "brushlabels":
        return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    flat = [v for x, y in result["value"]["points"] for v in (x * w / 100, y * h / 100)]
    return mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[:, :, 0] > 0


def independent_ious(tasks: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Per (control, label): pycocotools' IoU of the prediction's and the annotation's union, per task."""
    out: dict[tuple[str, str], list[float]] = {}
    for task in tasks:
        sides = [task["predictions"][0]["result"], task["annotations"][0]["result"]]
        keys = {(r["from_name"], r["value"][r["type"]][0]) for side in sides for r in side}
        for control, label in sorted(keys):
            masks = []
            for side in sides:
                m = np.zeros((H, W), bool)
                for r in side:
                    if (r["from_name"], r["value"][r["type"]][0]) == (control, label):
                        m |= _mask(r)
                masks.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
            out.setdefault((control, label), []).append(
                float(mask_utils.iou([masks[0]], [masks[1]], [0])[0, 0])
            )
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, list[dict], dict[str, int]]:
    tasks, done = make_corrected_export(24, width=W, height=H, seed=3)
    # a task annotated without a prediction, and one not annotated
    tasks.append({"id": 900, "data": {"image": "x.png"}, "predictions": [],
                  "annotations": [{"id": 900, "result": [], "lead_time": 99.0}]})  # fmt: skip
    tasks.append({"id": 901, "data": {"image": "y.png"}, "predictions": [], "annotations": []})
    path = tmp_path_factory.mktemp("report") / "export.json"
    path.write_text(json.dumps(tasks))
    return path, tasks, done


def test_report_figures_equal_the_independent_computation(export, tmp_path, capsys) -> None:
    path, tasks, done = export
    out = tmp_path / "report.json"
    assert main(["report", str(path), "--json", str(out), "--jobs", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == {
        "read": 26, "annotated": 25, "from_prediction": 24, "without_prediction": 1,
        "predictions_listed_by_id": 0,
    }  # fmt: skip
    (version, none) = report["versions"]
    assert {k: version[k] for k in done} == done  # what the "annotators" did, counted back
    assert none["model_version"] == "none" and none["lead_time_mean"] == 99.0
    lead = [t["annotations"][0]["lead_time"] for t in tasks[:24]]
    assert version["lead_time_mean"] == pytest.approx(statistics.fmean(lead))
    expected = independent_ious(tasks[:24])
    groups = {(g["control"], g["label"]): g for g in report["groups"]}
    assert set(groups) == set(expected)
    for key, ious in expected.items():
        g = groups[key]
        assert g["tasks"] == len(ious), key
        assert g["mask_iou_mean"] == pytest.approx(statistics.fmean(ious), abs=1e-12), key
        assert g["mask_iou_median"] == pytest.approx(statistics.median(ious), abs=1e-12), key
        assert sum(g["iou_histogram"]) == len(ious)
    table = capsys.readouterr().out
    assert "gem-ViT-B-16-openai-cfg0000" in table and "kept %" in table


def test_parallel_measuring_gives_the_same_report(export, tmp_path, monkeypatch) -> None:
    path, _, _ = export
    monkeypatch.setattr(report_cli, "PARALLEL_FROM", 2)
    outs = []
    for jobs in (1, 2):
        outs.append(tmp_path / f"{jobs}.json")
        assert main(["report", str(path), "--json", str(outs[-1]), "--jobs", str(jobs), "--per-task"]) == 0
    one, two = (json.loads(p.read_text()) for p in outs)
    assert one == two and len(one["per_task"]) == 25


def test_json_to_the_terminal_and_the_html_page(export, tmp_path, capsys) -> None:
    from PIL import Image

    path, _, _ = export
    folder = tmp_path / "html"
    assert main(["report", str(path), "--json", "--html", str(folder)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the JSON on stdout
    assert report["source"] == str(path)
    assert "HTML report written to" in captured.err
    page = (folder / "index.html").read_text()
    for name in ("changes.png", "iou_per_label.png", "iou_distribution.png"):
        assert f'src="{name}"' in page
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width >= 600
    assert "gem-ViT-B-16-openai-cfg0000" in page


def test_predictions_listed_by_id_are_named(tmp_path, capsys) -> None:
    tasks, _ = make_corrected_export(3, width=W, height=H)
    for t in tasks:
        t["predictions"] = [t["predictions"][0]["id"]]  # as Label Studio 1.23's JSON export lists them
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "3 task(s) list their predictions by id only" in text
    assert "0 from a prediction, 3 without one" in text


def test_input_is_required(capsys) -> None:
    assert main(["report"]) == 2
    assert "give either INPUT" in capsys.readouterr().err
