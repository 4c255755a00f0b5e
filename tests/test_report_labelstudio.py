"""``groundlabel report`` and the live ``/metrics`` proved against a real Label Studio.

A project of generated colour scenes (brush and polygon controls, the colours as labels) is pre-labelled by
the in-repo tiny CLIP behind GEM (the predictions imported with the tasks), and ``groundlabel serve`` is
connected to it as its ML backend, so that Label Studio sends it the annotation webhooks. "Annotators" then
submit annotations through Label Studio's API as the editor does (``parent_prediction``, ``lead_time``,
the prediction's region ids): on each task the first brush region kept as predicted and the others
replaced by the scene's true mask, the first polygon deleted on every other task (moved on the others),
a small brush region added on every third task; two tasks without a prediction are annotated from scratch.

Then ``groundlabel report --project N``: its mask IoUs equal pycocotools' on the same pairs (the
predictions read back from Label Studio, the annotations as submitted), its kept / edited / deleted /
added counts equal what the test did, its lead times the ones sent; and the backend's ``/metrics``, fed by
the webhooks, show the same figures. The HTML report is photographed in Chromium: into pytest's temporary
folder, or ``docs/images/report.png`` with ``GROUNDLABEL_UPDATE_DOCS_IMAGES=1``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, clean_env, serve_process

torch = pytest.importorskip("torch")
mask_utils = pytest.importorskip("pycocotools.mask")

from exporters.synthetic import brush_result  # noqa: E402
from groundlabel.ls_format import brush_rle_encode  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCENES = 12
SIZE = 48
SEED = 41
CLASSES = ["red", "green", "blue", "yellow", "purple", "orange"]
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image">'
    + "".join(f'<Label value="{c}"/>' for c in CLASSES)
    + "</BrushLabels>"
    '<PolygonLabels name="poly" toName="image">'
    + "".join(f'<Label value="{c}"/>' for c in CLASSES)
    + "</PolygonLabels></View>"
)


def label_of(region: dict) -> str:
    return region["value"][region["type"]][0]


def region_mask(region: dict) -> np.ndarray:
    """A region's mask as COCO tools make it: label-studio-sdk's brush decoder, pycocotools' polygons."""
    from label_studio_sdk.converter.brush import decode_rle

    w, h = region["original_width"], region["original_height"]
    if region["type"] == "brushlabels":
        return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    flat = [v for x, y in region["value"]["points"] for v in (x * w / 100, y * h / 100)]
    return mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[:, :, 0] > 0


def coco_ious(predicted: list[dict], annotated: list[dict]) -> dict[tuple[str, str], float]:
    """Per (control, label) present on either side: pycocotools' IoU of the two unions."""
    out = {}
    keys = {(r["from_name"], label_of(r)) for r in predicted + annotated}
    for control, label in sorted(keys):
        masks = []
        for side in (predicted, annotated):
            m = np.zeros((SIZE, SIZE), bool)
            for r in side:
                if (r["from_name"], label_of(r)) == (control, label):
                    m |= region_mask(r)
            masks.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
        if mask_utils.area(masks[0]) or mask_utils.area(masks[1]):
            out[(control, label)] = float(mask_utils.iou([masks[0]], [masks[1]], [0])[0, 0])
    return out


def correct(
    i: int, predicted: list[dict], truth: dict[str, np.ndarray], counts: dict[str, int]
) -> list[dict]:
    """The annotation of task ``i`` made from its prediction (module docstring); what was done goes into
    ``counts``."""
    import copy

    out = []
    brush = [r for r in predicted if r["type"] == "brushlabels"]
    polygons = [r for r in predicted if r["type"] == "polygonlabels"]
    for n, r in enumerate(brush):
        label = label_of(r)
        edited = n > 0 and label in truth and not np.array_equal(region_mask(r), truth[label])
        if edited:
            r = copy.deepcopy(r)
            r["value"]["rle"] = brush_rle_encode(truth[label])
        counts["edited" if edited else "kept"] += 1
        out.append(r)
    for n, r in enumerate(polygons):
        if n == 0 and i % 2 == 0:
            counts["deleted"] += 1
            continue
        if n == 0:
            r = copy.deepcopy(r)
            r["value"]["points"] = [[min(x + 6.0, 100.0), y] for x, y in r["value"]["points"]]
            counts["edited"] += 1
        else:
            counts["kept"] += 1
        out.append(r)
    if i % 3 == 0:
        corner = np.zeros((SIZE, SIZE), bool)
        corner[:3, :3] = True
        out.append(
            brush_result(brush_rle_encode(corner), CLASSES[0], SIZE, SIZE, rid=f"added{i}", from_name="mask")
        )
        counts["added"] += 1
    return out


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_report_and_live_metrics_of_a_label_studio_project(
    label_studio_session, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    import httpx

    from groundlabel.protocol import JobPayload
    from groundlabel.settings import Settings
    from groundlabel.spec import read_spec
    from groundlabel_cli.main import main
    from workers import engines
    from workers.evaluation.scenes import make_scenes
    from workers.evaluation.tiny_clip import export_open_clip
    from workers.jobs import run_prediction_job

    ls = label_studio_session
    clip_config, clip_weights = export_open_clip(REPO / "tests/assets/tiny_clip.pt", tmp_path / "clip")
    models = {
        "GROUNDLABEL_GEM_MODEL_CONFIG": str(clip_config),
        "GROUNDLABEL_GEM_PRETRAINED": str(clip_weights),
        "GROUNDLABEL_GEM_IMAGE_SIZE": str(SIZE),
        "GROUNDLABEL_GEM_TEMPERATURE": "80",
        "GROUNDLABEL_DEFAULT_THRESHOLD": "0.3",
        "GROUNDLABEL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    access = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.legacy_token}
    for key, value in {**models, **access}.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()

    # the project, pre-labelled by the tiny CLIP's GEM (two more tasks without a prediction)
    project = ls.create_project("report", CONFIG)
    folder = f"report{project}"
    ls.add_local_storage(project, folder)
    (ls.files_root / folder).mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(SCENES + 2, SEED, SIZE)
    data = []
    for i, scene in enumerate(scenes):
        scene.image.save(ls.files_root / folder / f"s{i:03d}.png")
        data.append({"image": f"/data/local-files/?d={folder}/s{i:03d}.png"})
    engines.configure(replace(settings, training=replace(settings.training, model_store=None)))
    try:
        jobs = [{"id": i + 1, "data": d} for i, d in enumerate(data[:SCENES])]
        predictions = run_prediction_job(JobPayload(jobs, read_spec(CONFIG, settings)))
    finally:
        engines.configure(Settings())
    assert all("error" not in p for p in predictions), predictions[:2]
    imported = [{"data": d, "predictions": [p]} for d, p in zip(data, predictions, strict=False)]
    ids = ls.import_tasks(project, imported + [{"data": d} for d in data[SCENES:]])
    assert len(ids) == SCENES + 2

    # groundlabel serve as the project's ML backend: Label Studio sends it the annotation webhooks
    with serve_process(clean_env({**models, **access}), tmp_path / "serve.log") as backend:
        ml = ls.api_json("POST", "/api/ml", json={"url": backend, "project": project, "title": "groundlabel"})
        assert ml.get("state") != "ER", ml
        hooks = ls.api_json("GET", "/api/webhooks", params={"project": project})
        assert [h["url"] for h in hooks] == [backend + "/webhook"]

        # the annotators
        counts = dict.fromkeys(("kept", "edited", "deleted", "added"), 0)
        expected: dict[tuple[str, str], list[float]] = {}
        lead_times = {"from": [], "none": []}
        for i, (task_id, scene) in enumerate(zip(ids, scenes, strict=True)):
            truth = {
                c: scene.colour_labels == k + 1
                for k, c in enumerate(CLASSES)
                if (scene.colour_labels == k + 1).any()
            }
            body = {"lead_time": 10.0 + i}
            if i < SCENES:
                (prediction,) = ls.predictions(task_id)
                result = correct(i, prediction["result"], truth, counts)
                body.update(result=result, parent_prediction=prediction["id"])
                for key, iou in coco_ious(prediction["result"], result).items():
                    expected.setdefault(key, []).append(iou)
                lead_times["from"].append(body["lead_time"])
            else:
                body["result"] = [
                    brush_result(brush_rle_encode(m), c, SIZE, SIZE, from_name="mask")
                    for c, m in truth.items()
                ]
                lead_times["none"].append(body["lead_time"])
            response = ls.api("POST", f"/api/tasks/{task_id}/annotations", json=body)
            assert response.status_code == 201, response.text[:300]
        assert counts["kept"] and counts["edited"] and counts["deleted"] and counts["added"]

        # the live figures, from the webhooks
        deadline = time.monotonic() + 120
        while True:
            text = httpx.get(backend + "/metrics", timeout=10).text
            if metric(text, "groundlabel_quality_events_total", outcome="measured") >= SCENES + 2:
                break
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

    # the report, through Label Studio's API
    out = tmp_path / "report.json"
    html = tmp_path / "html"
    assert main(["report", "--project", str(project), "--json", str(out), "--html", str(html)]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"]["from_prediction"] == SCENES and report["tasks"]["without_prediction"] == 2
    (version, none) = report["versions"]
    assert version["model_version"] == predictions[0]["model_version"] and version["engine"] == "gem"
    assert {k: version[k] for k in counts} == counts
    assert version["lead_time_mean"] == pytest.approx(statistics.fmean(lead_times["from"]))
    assert none["model_version"] == "none" and none["lead_time_mean"] == pytest.approx(
        statistics.fmean(lead_times["none"])
    )
    groups = {(g["control"], g["label"]): g for g in report["groups"] if g["tasks"]}
    assert set(groups) == set(expected)
    for key, ious in expected.items():
        assert groups[key]["tasks"] == len(ious), key
        assert groups[key]["mask_iou_mean"] == pytest.approx(statistics.fmean(ious), abs=1e-12), key

    # /metrics: the same figures, per label (over both controls)
    pid, mv = str(project), version["model_version"]
    assert metric(text, "groundlabel_quality_annotations_total", project=pid, model_version=mv) == SCENES
    assert metric(text, "groundlabel_quality_annotations_total", project=pid, model_version="none") == 2
    for change, count in counts.items():
        assert (
            metric(text, "groundlabel_quality_regions_total", project=pid, model_version=mv, change=change)
            == count
        )
    for label in {k[1] for k in expected}:
        ious = [v for (_, la), vs in expected.items() if la == label for v in vs]
        series = {"project": pid, "label": label, "model_version": mv}
        assert metric(text, "groundlabel_quality_mask_iou_count", **series) == len(ious)
        assert metric(text, "groundlabel_quality_mask_iou_sum", **series) == pytest.approx(
            sum(ious), abs=1e-9
        )
    lead_sum = metric(text, "groundlabel_quality_lead_time_seconds_sum", project=pid, model_version=mv)
    assert lead_sum == pytest.approx(sum(lead_times["from"]))

    with capsys.disabled():
        print(f"\nreport of project {project}: {counts}, mask IoU {version['mask_iou_mean']:.3f}")
    photograph(html / "index.html", tmp_path_factory)


def photograph(page: Path, tmp_path_factory) -> None:
    """A screenshot of the HTML report in Chromium: ``docs/images/report.png`` when
    ``GROUNDLABEL_UPDATE_DOCS_IMAGES=1``, else pytest's temporary folder."""
    sys.path.insert(0, str(REPO / "tests" / "browser"))
    from labelstudio_page import chromium, require_browser, screenshot_folder

    require_browser()
    folder = screenshot_folder(tmp_path_factory.getbasetemp())
    folder.mkdir(parents=True, exist_ok=True)
    with chromium() as context:
        tab = context.new_page()
        tab.set_viewport_size({"width": 1280, "height": 1400})
        tab.goto(page.as_uri())
        tab.wait_for_load_state("load")
        assert tab.locator("img").count() == 3
        assert tab.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        tab.screenshot(path=str(folder / "report.png"), full_page=False)
    assert (folder / "report.png").stat().st_size > 10_000
