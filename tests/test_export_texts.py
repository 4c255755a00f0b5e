"""Texts of every TextArea reach the RefCOCO / gRefCOCO exports, or the summary says why not."""

from __future__ import annotations

import json
import pickle

import pytest

from exporters import export_grefcoco, export_refcoco
from exporters.synthetic import polygon_result, text_result

W, H = 80, 60

#: A task-level prompt and a per-region description, as an annotator's project has them.
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
  <TextArea name="desc" toName="image" perRegion="true"/>
  <TextArea name="notes" toName="image"/>
</View>"""

SQUARE = [[10.0, 10.0], [40.0, 10.0], [40.0, 40.0], [10.0, 40.0]]
OTHER = [[55.0, 50.0], [90.0, 50.0], [90.0, 90.0], [55.0, 90.0]]


def _task(task_id: int, results: list[dict]) -> dict:
    return {
        "id": task_id,
        "data": {"image": f"/data/upload/1/img{task_id}.png"},
        "annotations": [{"id": 100 + task_id, "result": results}],
        "predictions": [],
    }


def _tasks() -> list[dict]:
    cat = polygon_result(SQUARE, "cat", W, H, rid="cat1")
    dog = polygon_result(OTHER, "dog", W, H, rid="dog1")
    return [
        # per-region descriptions on two regions (second TextArea), nothing from the prompt
        _task(
            1,
            [
                cat,
                dog,
                text_result("the cat on the left", rid="cat1", from_name="desc"),
                text_result("brown dog\nthe dog at the bottom", rid="dog1", from_name="desc"),
            ],
        ),
        # the prompt (per task) on one region, and a task-level note that is not an expression
        _task(
            2,
            [
                polygon_result(SQUARE, "cat", W, H, rid="cat2"),
                text_result("a cat", from_name="prompt"),
                text_result("blurry image", from_name="notes"),
            ],
        ),
    ]


def _sentences(refs: list[dict]) -> dict[str, int]:
    return {s["raw"]: r["image_id"] for r in refs for s in r["sentences"]}


@pytest.mark.parametrize("fmt", ["refcoco", "grefcoco"])
def test_per_region_text_of_a_second_textarea_is_exported(fmt, tmp_path):
    export = export_refcoco if fmt == "refcoco" else export_grefcoco
    summary = export(_tasks(), tmp_path, label_config=CONFIG, images="none")
    if fmt == "refcoco":
        refs = pickle.loads((tmp_path / "refcoco" / "refs(unc).p").read_bytes())
    else:
        refs = json.loads((tmp_path / "grefcoco" / "grefs(unc).json").read_text())
    assert _sentences(refs) == {
        "the cat on the left": 1,
        "brown dog": 1,
        "the dog at the bottom": 1,
        "a cat": 2,
    }
    # The task-level note is not taken as an expression, and the summary says so.
    assert summary.skipped["text from another TextArea"] == 1
    example = summary.examples["text from another TextArea"][0]
    assert "task 2" in example and "notes" in example and "--text-from notes" in example
    assert "text from another TextArea" in summary.format_text()


def test_text_from_picks_one_textarea_and_reports_the_others(tmp_path):
    summary = export_refcoco(_tasks(), tmp_path, label_config=CONFIG, images="none", text_from="notes")
    refs = pickle.loads((tmp_path / "refcoco" / "refs(unc).p").read_bytes())
    assert _sentences(refs) == {"blurry image": 2}
    # desc x2 (task 1) and prompt (task 2) are reported, not dropped silently
    assert summary.skipped["text from another TextArea"] == 3


def test_coco_export_reports_no_text(tmp_path):
    from exporters import export_coco

    summary = export_coco(_tasks(), tmp_path, label_config=CONFIG, images="none")
    assert "text from another TextArea" not in summary.skipped
