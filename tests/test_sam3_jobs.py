"""SAM 3 through the pipeline and the job: one region per instance in every control, each with its own
score, the control's threshold on instance scores, the engine chosen per control and per deployment,
and typed phrases answered with instances."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, png_data_uri  # noqa: E402
from PIL import Image  # noqa: E402
from sam3_tiny import tiny_sam3_engine  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from groundlabel.ls_format import brush_rle_decode  # noqa: E402
from groundlabel.settings import Settings  # noqa: E402
from groundlabel.spec import parse_label_config  # noqa: E402
from workers import engines, pipeline  # noqa: E402
from workers.jobs import run_job  # noqa: E402
from workers.models.sam3 import Instance  # noqa: E402

CONTROLS = """
  <PolygonLabels name="poly" toName="image" {attrs}>{labels}</PolygonLabels>
  <BrushLabels name="brush" toName="image" {attrs}>{labels}</BrushLabels>
  <RectangleLabels name="box" toName="image" {attrs}>{labels}</RectangleLabels>
  <KeyPointLabels name="point" toName="image" {attrs}>{labels}</KeyPointLabels>
"""
LABELS = '<Label value="Car" predicted_values="car,automobile"/><Label value="Dog"/>'


def config(attrs: str = 'engine="sam3" model_score_threshold="0"', extra: str = "") -> str:
    body = CONTROLS.format(attrs=attrs, labels=LABELS)
    return f'<View><Image name="image" value="$image"/>{body}{extra}</View>'


def decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module")
def sam3():
    return tiny_sam3_engine()


@pytest.fixture
def worker(sam3, monkeypatch):
    """A worker process's engines: tiny GEM and tiny SAM 3, settings from the environment."""
    monkeypatch.setenv("GROUNDLABEL_DEVICE", "cpu")
    monkeypatch.delenv("GROUNDLABEL_LAVT_CHECKPOINT", raising=False)
    gem = make_tiny_gem_engine()

    def run(xml: str, tasks: list[dict], context: dict | None = None) -> list[dict]:
        engines.configure(Settings.from_env())
        engines.set_engine("gem", gem)
        engines.set_engine("sam3", sam3)
        spec = parse_label_config(xml)
        return run_job({"tasks": tasks, "spec": spec.to_dict(), "context": context, "label_studio_url": None})

    yield run
    engines.configure(Settings())


def by_control(prediction: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in prediction["result"]:
        out.setdefault(r["from_name"], []).append(r)
    return out


def test_every_instance_is_its_own_region_in_every_control(worker, sam3):
    uri = png_data_uri(64, 48, seed=3)
    (prediction,) = worker(config(), [{"id": 1, "data": {"image": uri}}])
    assert "error" not in prediction and prediction["model_version"] == "sam3-custom"

    spec = parse_label_config(config())
    prompts, groups = pipeline.prompt_groups(spec)
    (instances,) = sam3.instances([decode(uri)], prompts, groups=groups)
    assert len(instances) >= 2
    scores = sorted(round(i.score, 4) for i in instances)
    regions = by_control(prediction)
    for name in ("brush", "box", "point"):  # exactly one region per instance
        assert sorted(r["score"] for r in regions[name]) == scores, name
    assert len(regions["poly"]) >= len(instances)  # an instance in several parts: several polygons
    assert set(r["score"] for r in regions["poly"]) <= set(scores)
    assert len(set(scores)) > 1  # each with its own score, not one blob
    label_of = {"car": "Car", "automobile": "Car", "Dog": "Dog"}
    expected_labels = sorted(label_of[i.prompt] for i in instances)
    assert sorted(r["value"]["brushlabels"][0] for r in regions["brush"]) == expected_labels
    best = max(instances, key=lambda i: i.score)
    (brush,) = [r for r in regions["brush"] if r["score"] == round(best.score, 4)]
    assert np.array_equal(brush_rle_decode(brush["value"]["rle"], 48, 64) > 0, best.mask)


def test_the_controls_threshold_applies_to_instance_scores(worker, sam3):
    uri = png_data_uri(64, 48, seed=4)
    (low,) = worker(config(), [{"id": 1, "data": {"image": uri}}])
    scores = sorted(r["score"] for r in low["result"] if r["from_name"] == "box")
    cut = scores[len(scores) // 2]
    xml = config(f'engine="sam3" model_score_threshold="{cut}"')
    (high,) = worker(xml, [{"id": 1, "data": {"image": uri}}])
    kept = [r["score"] for r in high["result"] if r["from_name"] == "box"]
    assert kept and len(kept) < len(scores) and min(kept) >= cut


def test_duplicates_across_synonyms_are_merged(sam3):
    uri = png_data_uri(64, 48, seed=5)
    image = decode(uri)
    one = '<Label value="Car" predicted_values="car"/>'
    two = '<Label value="Car" predicted_values="car,car"/>'
    apart = '<Label value="Car" predicted_values="car"/><Label value="Auto" predicted_values="car"/>'
    counts = []
    for labels in (one, two, apart):
        xml = (
            '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image" '
            f'model_score_threshold="0">{labels}</BrushLabels></View>'
        )
        (regions,) = pipeline.instance_regions(sam3, parse_label_config(xml), [image])
        counts.append(len(regions.results))
    assert counts[0] >= 2 and counts[1] == counts[0]
    assert counts[2] == counts[0]  # a prompt shared by two labels is found once, for its first label


def test_the_engine_per_deployment_and_per_control(worker, monkeypatch):
    uri = png_data_uri(64, 48, seed=6)
    plain = config('model_score_threshold="0"')
    (gem_answer,) = worker(plain, [{"id": 1, "data": {"image": uri}}])
    assert gem_answer["model_version"].startswith("gem-tinyclip")
    monkeypatch.setenv("GROUNDLABEL_ENGINE", "sam3")
    (sam3_answer,) = worker(plain, [{"id": 1, "data": {"image": uri}}])
    assert sam3_answer["model_version"] == "sam3-custom"
    mixed = (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="gem" toName="image" engine="gem">{LABELS}</BrushLabels>'
        f'<RectangleLabels name="sam" toName="image" model_score_threshold="0">{LABELS}</RectangleLabels>'
        "</View>"
    )
    (both,) = worker(mixed, [{"id": 1, "data": {"image": uri}}])
    assert both["model_version"] == gem_answer["model_version"] + "+sam3-custom"
    assert {r["from_name"] for r in both["result"]} <= {"gem", "sam"}
    assert any(r["from_name"] == "sam" for r in both["result"])


def test_an_unknown_engine_is_refused_with_the_choices(monkeypatch):
    with pytest.raises(UserError, match="engine='sam4' is not one of gem, sam3"):
        parse_label_config(config('engine="sam4"'))
    with pytest.raises(UserError, match="GROUNDLABEL_ENGINE"):
        Settings.from_env({"GROUNDLABEL_ENGINE": "lavt"})


def test_a_typed_phrase_returns_instances_not_one_blob(worker, sam3):
    uri = png_data_uri(64, 48, seed=7)
    extra = '<TextArea name="prompt" toName="image"/>'
    context = {
        "result": [
            {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["dog"]}}
        ]
    }
    (answer,) = worker(config(extra=extra), [{"id": 1, "data": {"image": uri}}], context)
    (instances,) = sam3.instances([decode(uri)], ["dog"])
    assert len(instances) >= 2
    regions = by_control(answer)
    assert len(regions["brush"]) == len(regions["box"]) == len(instances)
    assert {r["value"]["brushlabels"][0] for r in regions["brush"]} == {"Dog"}  # the label the phrase names
    (gem_answer,) = worker(
        config('model_score_threshold="0"', extra), [{"id": 1, "data": {"image": uri}}], context
    )
    assert len(by_control(gem_answer).get("brush", [])) <= 1  # GEM: one mask for the phrase


def test_instance_regions_geometry():
    """One instance in two parts and a speck: two polygons, one brush mask, one box, one point."""
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:20] = True
    mask[25:35, 30:50] = True
    mask[0, 59] = True  # a one-pixel speck, below min_region_area
    inst = Instance("car", "Car", 0.8125, mask, (5.0, 5.0, 50.0, 35.0))
    spec = parse_label_config(config('min_region_area="4"'))
    controls = {c.name: c for c in spec.controls}
    out = {
        name: pipeline.instance_results(control, "Car", inst, width=60, height=40)
        for name, control in controls.items()
    }
    assert len(out["poly"]) == 2 and len(out["brush"]) == len(out["box"]) == len(out["point"]) == 1
    assert all(r["score"] == 0.8125 for rs in out.values() for r in rs)
    box = out["box"][0]["value"]
    assert (box["x"], box["y"]) == pytest.approx((100 * 5 / 60, 100 * 5 / 40), abs=1e-3)
    assert (box["width"], box["height"]) == pytest.approx((100 * 45 / 60, 100 * 30 / 40), abs=1e-3)
    point = out["point"][0]["value"]
    col, row = int(point["x"] * 60 / 100), int(point["y"] * 40 / 100)
    assert mask[row, col]
    decoded = brush_rle_decode(out["brush"][0]["value"]["rle"], 40, 60) > 0
    assert decoded.sum() == mask.sum() - 1 and not decoded[0, 59]
