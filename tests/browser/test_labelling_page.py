"""What an annotator sees of groundlabel in Label Studio's own labelling page, in a real Chromium.

One Label Studio 1.23 and one ``groundlabel serve`` (GEM on the tiny random-weight CLIP) are shared by the
session (``tests/conftest.py``); one browser is shared by this module. The label configs are read from
``docs/labelstudio.md`` as written there (``<!-- label-config: NAME -->`` before an ``xml`` block), with
one change: every control gets ``model_score_threshold="0"``, because the random model's maps are low
everywhere and a default threshold would leave every answer empty. The screenshots go to
``docs/images/`` (``GROUNDLABEL_TEST_SCREENSHOTS`` redirects them).

The answers are checked where an annotator would look (the suggestions counter, the region list, the
canvas) and in what Label Studio stores; the geometry is checked against the clicks: a positive key
point lies inside the brush mask it returns, a negative one outside, a box's answer inside the box.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, clean_env, png_bytes
from labelstudio_page import LabelingPage, chromium, log_in, require_browser

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.integration]

DOCS = REPO / "docs" / "labelstudio.md"
WIDTH, HEIGHT = 320, 240  # the test image: a red square over the middle half on a dark background
NOISE = 6  # a little texture for the model; little enough that the screenshots stay small


def docs_config(name: str) -> str:
    """The label config marked ``<!-- label-config: name -->`` in docs/labelstudio.md, thresholds at 0."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- label-config: {re.escape(name)} -->\s*```xml\n(.*?)```", text, re.S)
    assert match, f"docs/labelstudio.md has no label config named {name!r}"
    xml = match.group(1)
    return re.sub(
        r"<(PolygonLabels|BrushLabels|RectangleLabels|KeyPointLabels) ",
        r'<\1 model_score_threshold="0" ',
        xml,
    )


@pytest.fixture(scope="session", autouse=True)
def _chromium_installed() -> None:
    """Skip (fail under CI=true) before anything starts when Chromium or Playwright is missing."""
    require_browser()


@pytest.fixture(scope="module")
def ls(label_studio_session):
    return label_studio_session


@pytest.fixture(scope="module")
def page(ls, serve_backend):
    """One logged-in browser page for the module."""
    with chromium() as context:
        tab = context.new_page()
        log_in(tab, ls.url, ls.username, ls.password)
        yield LabelingPage(tab, ls.url)


def make_project(
    ls, backend: str, title: str, config: str, n_tasks: int = 1, *, prelabel: bool = False
) -> tuple[int, list[int]]:
    """A project with ``n_tasks`` local-files images and groundlabel connected as an interactive backend.

    ``prelabel`` keeps Label Studio's *Use predictions to prelabel tasks*; without it the canvas starts
    empty, so that what appears comes from the prompt or the click.
    """
    project = int(
        ls.api_json(
            "POST",
            "/api/projects",
            json={"title": title, "label_config": config, "show_collab_predictions": prelabel},
        )["id"]
    )
    folder = f"browser{project}"
    ls.add_local_storage(project, folder)
    for i in range(n_tasks):
        Path(ls.files_root, folder, f"img{i}.png").write_bytes(png_bytes(WIDTH, HEIGHT, seed=i, noise=NOISE))
    ids = ls.import_tasks(
        project, [{"image": f"/data/local-files/?d={folder}/img{i}.png"} for i in range(n_tasks)]
    )
    ml = ls.api_json(
        "POST",
        "/api/ml",
        json={"url": backend, "project": project, "title": "groundlabel", "is_interactive": True},
    )
    assert ml.get("state") != "ER", ml
    return project, ids


def brush_mask(region: dict[str, Any]) -> np.ndarray:
    """A brush result's mask (rows × columns, booleans)."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def pixel(x: float, y: float) -> tuple[int, int]:
    """The (row, column) of the test image at percent coordinates."""
    return min(int(y * HEIGHT / 100), HEIGHT - 1), min(int(x * WIDTH / 100), WIDTH - 1)


def kind_and_label(region: dict[str, Any]) -> tuple[str, str]:
    return region["type"], region["value"][region["type"]][0]


def by_type(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["type"], []).append(r)
    return out


def test_typed_prompt_draws_regions_with_the_configured_labels(page, ls, serve_backend):
    config = docs_config("typed-prompt")
    project, (task,) = make_project(ls, serve_backend, "browser typed prompt", config)
    page.open_task(project, task)
    assert page.page.get_by_placeholder("What to find, e.g. the red car").is_visible()  # the prompt box
    page.enable_auto_annotation()
    with page.answer() as answer:
        page.type_prompt("the red car")
    sent = [r for r in answer["context"]["result"] if r["type"] == "textarea"]
    assert [r["value"]["text"] for r in sent] == [["the red car"]] and sent[0]["from_name"] == "prompt"
    assert page.wait_for_suggestions() == 2  # one region per control
    page.accept_suggestions()
    page.screenshot("typed-prompt")

    regions = by_type(page.results())
    assert [r["value"]["polygonlabels"] for r in regions["polygonlabels"]] == [["Car"]]
    assert [r["value"]["brushlabels"] for r in regions["brushlabels"]] == [["Car"]]
    for r in regions["polygonlabels"] + regions["brushlabels"]:
        assert (r["original_width"], r["original_height"]) == (WIDTH, HEIGHT)
    assert brush_mask(regions["brushlabels"][0]).any()
    assert page.region_list() == ["Car", "Car"]


def test_smart_key_points_and_box(page, ls, serve_backend):
    config = docs_config("clicks")
    project, (task,) = make_project(ls, serve_backend, "browser clicks", config)
    page.open_task(project, task)
    page.enable_auto_annotation()

    # A smart rectangle: the answer stays inside the box.
    page.choose_label("Car", control=1)
    page.choose_smart_tool("rectangle-tool")
    with page.answer() as box_answer:
        page.drag_on_image(20, 30, 60, 80)
    (sent_box,) = box_answer["context"]["result"]
    assert sent_box["type"] == "rectanglelabels" and sent_box["value"]["rectanglelabels"] == ["Car"]
    bx, by, bw, bh = (sent_box["value"][k] for k in ("x", "y", "width", "height"))
    assert abs(bx - 20) < 1.5 and abs(by - 30) < 1.5 and abs(bw - 40) < 1.5 and abs(bh - 50) < 1.5
    answered = by_type(box_answer["data"]["result"])
    assert "rectanglelabels" not in answered  # the control drawn with gets nothing back
    mask = brush_mask(answered["brushlabels"][0])
    rows, cols = np.nonzero(mask)
    assert rows.size and answered["brushlabels"][0]["value"]["brushlabels"] == ["Car"]
    assert cols.min() >= int(bx * WIDTH / 100) - 1 and cols.max() <= int((bx + bw) * WIDTH / 100) + 1
    assert rows.min() >= int(by * HEIGHT / 100) - 1 and rows.max() <= int((by + bh) * HEIGHT / 100) + 1
    page.page.get_by_test_id("bottombar-reject-suggestions-button").click()

    # A positive smart key point on the square, then a negative one: Label Studio sends both.
    page.choose_label("Car", control=0)
    page.choose_smart_tool("key-point-tool")
    with page.answer() as positive:
        page.click_image(50, 50)
    (point,) = positive["context"]["result"]
    assert point["type"] == "keypointlabels" and point["is_positive"] is True
    assert abs(point["value"]["x"] - 50) < 1 and abs(point["value"]["y"] - 50) < 1
    first = by_type(positive["data"]["result"])
    assert set(first) == {"rectanglelabels", "brushlabels"}  # every control but the key points'
    assert brush_mask(first["brushlabels"][0])[pixel(point["value"]["x"], point["value"]["y"])]
    page.wait_for_suggestions()

    page.choose_label("Car", control=0)  # Label Studio deselects the label after each point
    with page.answer() as negative:
        page.click_image(80, 20, negative=True)
    sent = negative["context"]["result"]
    assert [p["is_positive"] for p in sent] == [True, False]
    after = by_type(negative["data"]["result"]).get("brushlabels", [])
    neg = sent[1]["value"]
    for region in after:
        assert not brush_mask(region)[pixel(neg["x"], neg["y"])]
        assert brush_mask(region).sum() <= brush_mask(first["brushlabels"][0]).sum()
    if after:
        page.wait_for_suggestions()
    page.screenshot("smart-clicks")


def test_referring_expression_gets_one_region_labelled_by_the_rule(page, ls, serve_backend):
    config = docs_config("referring")
    project, (task,) = make_project(ls, serve_backend, "browser referring", config)
    page.open_task(project, task)
    page.enable_auto_annotation(auto_accept=True)
    with page.answer() as answer:
        page.type_prompt("the red car in the middle")
    assert "-expressions" in answer["data"]["model_version"]  # GEM stands in for LAVT
    page.page.wait_for_function(
        "() => window.Htx.annotationStore.selected.regions.some(r => r.type === 'polygonregion')"
    )
    polygons = by_type(page.results())["polygonlabels"]
    # One region; "Car" is named in the sentence, although "Person" is the control's first label.
    assert [r["value"]["polygonlabels"] for r in polygons] == [["Car"]]
    assert page.region_list() == ["Car"]
    page.page.locator(".lsf-outliner-item__title", has_text="Car").click()  # its details in the side panel
    page.screenshot("referring-expression")


def test_retrieve_predictions_accept_and_export_to_coco(page, ls, serve_backend, tmp_path):
    config = docs_config("typed-prompt")
    project, ids = make_project(ls, serve_backend, "browser retrieve", config, n_tasks=3, prelabel=True)
    p = page.page
    page.open_data_manager(project)
    p.get_by_label("Select all rows").check()
    p.get_by_label("Tasks Actions").click()
    p.get_by_text("Retrieve Predictions", exact=True).click()
    with p.expect_response(
        lambda r: "/api/dm/actions" in r.url and "retrieve_tasks_predictions" in r.url, timeout=120_000
    ) as action:
        p.get_by_role("button", name="Confirm").click()  # the dialog's OK
    assert action.value.status == 200, action.value.text()
    deadline = time.monotonic() + 120  # Label Studio answers the action first, then predicts
    while True:
        stored = {t: ls.predictions(t) for t in ids}
        if all(stored.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(len(v) == 1 and v[0]["result"] for v in stored.values()), stored

    page.open_task(project, ids[1])
    p.wait_for_function("() => window.Htx.annotationStore.selected.regions.length > 0")
    prediction = stored[ids[1]][0]
    shown = page.results()
    assert sorted(r["id"] for r in shown) == sorted(r["id"] for r in prediction["result"])
    assert p.get_by_text(prediction["model_version"][:8], exact=False).first.is_visible()
    page.screenshot("retrieve-predictions")
    page.submit()

    # The submitted annotation, exported by groundlabel to COCO, holds the same regions.
    out = tmp_path / "coco"
    env = clean_env({"LABEL_STUDIO_API_KEY": ls.legacy_token})
    argv = [sys.executable, "-m", "groundlabel", "export", "--project", str(project), "--url", ls.url]
    run = subprocess.run(
        [*argv, "--format", "coco", "--out", str(out), "--images", "none", "--quiet"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    coco = json.loads((out / "instances.json").read_text())
    (annotated,) = [t for t in ls.list_tasks(project) if t["id"] == ids[1]]
    (image,) = [im for im in coco["images"] if im["labelstudio"]["task_id"] == ids[1]]
    assert (image["width"], image["height"]) == (WIDTH, HEIGHT)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    regions = [r for r in shown if r["type"] in ("polygonlabels", "brushlabels")]
    assert len(anns) == len(regions)
    assert sorted(names[a["category_id"]] for a in anns) == sorted(kind_and_label(r)[1] for r in regions)
    for region in regions:  # each region's box, in pixels, is one of the COCO boxes
        if region["type"] == "polygonlabels":
            xs = [pt[0] * WIDTH / 100 for pt in region["value"]["points"]]
            ys = [pt[1] * HEIGHT / 100 for pt in region["value"]["points"]]
            expected = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        else:
            rows, cols = np.nonzero(brush_mask(region))
            expected = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        assert any(np.allclose(a["bbox"], expected, atol=1.0) for a in anns), (expected, anns)
    assert annotated["total_annotations"] == 1

    # The COCO file back into Label Studio, where the annotator looks at what was exported.
    from exporters.coco import coco_to_labelstudio  # what `groundlabel export --format labelstudio` runs

    (task_back,) = coco_to_labelstudio(out / "instances.json", label_config=config, as_predictions=False)
    assert task_back["data"]["image"] == annotated["data"]["image"]
    viewer = int(
        ls.api_json(
            "POST",
            "/api/projects",
            json={"title": "browser export loaded", "label_config": config, "show_collab_predictions": False},
        )["id"]
    )
    (reloaded,) = ls.import_tasks(viewer, [task_back])
    page.open_task(viewer, reloaded)
    p.wait_for_function("() => window.Htx.annotationStore.selected.regions.length > 0")
    loaded = [r for r in page.results() if r["type"] in ("polygonlabels", "brushlabels")]
    assert sorted(kind_and_label(r) for r in loaded) == sorted(kind_and_label(r) for r in regions)
    page.screenshot("export-loaded")
