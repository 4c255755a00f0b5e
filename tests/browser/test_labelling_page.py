"""What an annotator sees of groundlabel in Label Studio's own labelling page, in a real Chromium.

One Label Studio 1.23 is shared by the session (``tests/conftest.py``); this module starts one
``groundlabel serve`` on the in-repo trained tiny models, written by ``groundlabel export-tiny-models``
(the tiny CLIP behind GEM, the tiny SAM for clicks, boxes and ``refine=sam``, with the settings that
command writes), and one browser. The tasks are generated colour scenes (``workers/evaluation/scenes.py``,
from seeds that training never used) whose true masks are known, because the tiny models know nothing
else. The label configs are read from ``docs/labelstudio.md`` as written there (``<!-- label-config:
NAME -->`` before an ``xml`` block), with one change: the labels are renamed to the colours the tiny CLIP
knows (``Car`` → ``Blue``...). The screenshots go to pytest's temporary folder, or to ``docs/images/`` with
``GROUNDLABEL_UPDATE_DOCS_IMAGES=1`` (``labelstudio_page.screenshot_folder``).

The answers are checked where an annotator would look (the suggestions counter, the region list, the
canvas), in what Label Studio stores, and against the scene: each mask and polygon lies on the shape it
names (IoU with the scene's true mask above a bound), a clicked point lies inside its mask, a negative
one outside, a box's answer inside the box.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, clean_env, serve_process
from labelstudio_page import (
    LabelingPage,
    ScreenshotSummary,
    chromium,
    log_in,
    require_browser,
    screenshot_folder,
)

from workers.evaluation.scenes import COLOURS, Scene, make_scene
from workers.evaluation.tiny_models import SCENE_SCALE, SCENE_SIZE, scene_mask, scene_picture

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.integration]

DOCS = REPO / "docs" / "labelstudio.md"
SIDE = SCENE_SIZE * SCENE_SCALE  # the task images: 48 px scenes shown at 240 x 240
#: Each test draws its scenes from a seed of its own (the tiny models trained on seeds 0-8; the quality
#: tests' held-out scenes use 12345 and 20240601), picked among the first few seeds where the tiny models
#: get every scene right: the pictures show what groundlabel does. How often the tiny models miss is
#: measured on held-out scenes (docs/quality.md, docs/sam.md).
SEEDS = {"typed": 31_001, "clicks": 31_002, "referring": 31_004, "retrieve": 31_004}
#: The least IoU between an answer and the true mask of the shape it names. The answers reach 0.8-0.95 on
#: these scenes; a mask over the whole image scores below 0.1 (a shape covers a few per cent of it).
MIN_IOU = 0.6


def docs_config(name: str, labels: dict[str, str]) -> str:
    """The label config marked ``<!-- label-config: name -->`` in docs/labelstudio.md, its labels renamed
    by ``labels`` (their own prompts, ``predicted_values``, dropped: the label is the prompt)."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- label-config: {re.escape(name)} -->\s*```xml\n(.*?)```", text, re.S)
    assert match, f"docs/labelstudio.md has no label config named {name!r}"
    xml = re.sub(r' predicted_values="[^"]*"', "", match.group(1))
    for old, new in labels.items():
        assert f'<Label value="{old}"' in xml, (old, xml)
        xml = xml.replace(f'<Label value="{old}"', f'<Label value="{new}"')
    return xml


def colour_objects(scene: Scene) -> dict[str, list[np.ndarray]]:
    """The scene's visible objects (one shape of one colour, connected) by colour name."""
    from workers.evaluation.scenes import instance_masks

    names = list(COLOURS)
    out: dict[str, list[np.ndarray]] = {}
    for mask in instance_masks(scene):
        out.setdefault(names[int(np.bincount(scene.colour_labels[mask]).argmax()) - 1], []).append(mask)
    return out


def scenes_with(colours: list[str], seed: int, count: int = 1) -> list[Scene]:
    """The first ``count`` scenes of ``seed`` with two or three objects, each of ``colours`` being exactly
    one object of at least 60 of the scene's pixels."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < count:
        scene = make_scene(rng, SCENE_SIZE, min_objects=2, max_objects=3)
        objects = colour_objects(scene)
        if all(len(objects.get(c, [])) == 1 and objects[c][0].sum() >= 60 for c in colours):
            out.append(scene)
    return out


def truth(scene: Scene, colour: str) -> np.ndarray:
    """The true mask of ``colour`` at the task image's size."""
    return scene_mask(scene.colour_labels == list(COLOURS).index(colour) + 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@pytest.fixture(scope="session", autouse=True)
def _chromium_installed() -> None:
    """Skip (fail under CI=true) before anything starts when Chromium or Playwright is missing."""
    require_browser()


@pytest.fixture(scope="module")
def ls(label_studio_session):
    return label_studio_session


@pytest.fixture(scope="module")
def tiny_backend(ls, tmp_path_factory) -> Iterator[str]:
    """``groundlabel serve`` on the trained tiny models, configured by the settings that
    ``groundlabel export-tiny-models`` writes, downloading the images from Label Studio."""
    from workers.evaluation.tiny_models import export_tiny_models

    folder = tmp_path_factory.mktemp("tiny-models")
    models = export_tiny_models(folder, REPO / "tests/assets/tiny_clip.pt", REPO / "tests/assets/tiny_sam.pt")
    env = clean_env(
        {
            **models.settings(),
            "GROUNDLABEL_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.personal_access_token(),
        }
    )
    with serve_process(env, folder / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory, pytestconfig) -> Path:
    """The screenshots' folder, named at the end of the session's report."""
    folder = screenshot_folder(tmp_path_factory.getbasetemp())
    pytestconfig.pluginmanager.register(ScreenshotSummary(folder), "groundlabel-browser-screenshots")
    return folder


@pytest.fixture(scope="module")
def page(ls, tiny_backend, screenshots):
    """One logged-in browser page for the module."""
    with chromium() as context:
        tab = context.new_page()
        log_in(tab, ls.url, ls.username, ls.password)
        yield LabelingPage(tab, ls.url, screenshots)


def make_project(
    ls, backend: str, title: str, config: str, scenes: list[Scene], *, prelabel: bool = False
) -> tuple[int, list[int]]:
    """A project with one local-files task per scene and groundlabel connected as an interactive backend.

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
    for i, scene in enumerate(scenes):
        scene_picture(scene.image).save(Path(ls.files_root, folder, f"scene{i}.png"))
    ids = ls.import_tasks(
        project, [{"image": f"/data/local-files/?d={folder}/scene{i}.png"} for i in range(len(scenes))]
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


def polygon_mask(region: dict[str, Any]) -> np.ndarray:
    """A polygon result filled at the image's size."""
    from PIL import Image, ImageDraw

    w, h = region["original_width"], region["original_height"]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(x * w / 100, y * h / 100) for x, y in region["value"]["points"]], fill=1)
    return np.asarray(canvas) > 0


def labelled(results: list[dict[str, Any]], kind: str, label: str) -> np.ndarray:
    """The union of the ``kind`` regions (``brushlabels``, ``polygonlabels``) labelled ``label``."""
    draw = brush_mask if kind == "brushlabels" else polygon_mask
    out = np.zeros((SIDE, SIDE), dtype=bool)
    for r in results:
        if r["type"] == kind and r["value"][kind] == [label]:
            out |= draw(r)
    return out


def pixel(x: float, y: float) -> tuple[int, int]:
    """The (row, column) of the task image at percent coordinates."""
    return min(int(y * SIDE / 100), SIDE - 1), min(int(x * SIDE / 100), SIDE - 1)


def percent(x: float, y: float) -> tuple[float, float]:
    """Image pixel coordinates as percent of the task image."""
    return 100 * x / SIDE, 100 * y / SIDE


def kind_and_label(region: dict[str, Any]) -> tuple[str, str]:
    return region["type"], region["value"][region["type"]][0]


def by_type(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["type"], []).append(r)
    return out


def test_typed_prompt_draws_regions_on_the_shape_it_names(page, ls, tiny_backend, screenshots):
    config = docs_config("typed-prompt", {"Car": "Blue", "Person": "Yellow"})
    (scene,) = scenes_with(["blue", "yellow"], SEEDS["typed"])
    project, (task,) = make_project(ls, tiny_backend, "browser typed prompt", config, [scene])
    page.open_task(project, task)
    assert page.page.get_by_placeholder("What to find, e.g. the red car").is_visible()  # the prompt box
    page.enable_auto_annotation()
    with page.answer() as answer:
        page.type_prompt("the blue shape")
    sent = [r for r in answer["context"]["result"] if r["type"] == "textarea"]
    assert [r["value"]["text"] for r in sent] == [["the blue shape"]] and sent[0]["from_name"] == "prompt"
    assert page.wait_for_suggestions() == 2  # one region per control
    page.accept_suggestions()
    page.screenshot("typed-prompt")

    results = page.results()
    regions = by_type(results)
    assert [r["value"]["polygonlabels"] for r in regions["polygonlabels"]] == [["Blue"]]
    assert [r["value"]["brushlabels"] for r in regions["brushlabels"]] == [["Blue"]]
    for r in regions["polygonlabels"] + regions["brushlabels"]:
        assert (r["original_width"], r["original_height"]) == (SIDE, SIDE)
    blue = truth(scene, "blue")
    assert iou(labelled(results, "brushlabels", "Blue"), blue) > MIN_IOU
    assert iou(labelled(results, "polygonlabels", "Blue"), blue) > MIN_IOU
    assert page.region_list() == ["Blue", "Blue"]


def test_smart_key_points_and_box_answered_by_sam(page, ls, tiny_backend, screenshots):
    config = docs_config("clicks", {"Car": "Yellow"})
    (scene,) = scenes_with(["yellow"], SEEDS["clicks"])
    (yellow,) = colour_objects(scene)["yellow"]
    yellow = scene_mask(yellow)
    project, (task,) = make_project(ls, tiny_backend, "browser clicks", config, [scene])
    page.open_task(project, task)
    page.enable_auto_annotation()

    # A smart rectangle around the yellow shape: SAM's answer is the shape, inside the box.
    from workers.models.sam.refine import interior_point

    rows, cols = np.nonzero(yellow)
    # a margin of 8 pixels, but no closer to the image's edge than 3 % (a drag from the very edge drew no
    # box in Label Studio 1.23)
    x0, y0 = (max(v, 3.0) for v in percent(cols.min() - 8, rows.min() - 8))
    x1, y1 = (min(v, 97.0) for v in percent(cols.max() + 9, rows.max() + 9))
    page.choose_label("Yellow", control=1)
    page.choose_smart_tool("rectangle-tool")
    with page.answer() as box_answer:
        page.drag_on_image(x0, y0, x1, y1)
    (sent_box,) = box_answer["context"]["result"]
    assert sent_box["type"] == "rectanglelabels" and sent_box["value"]["rectanglelabels"] == ["Yellow"]
    bx, by, bw, bh = (sent_box["value"][k] for k in ("x", "y", "width", "height"))
    assert (
        abs(bx - x0) < 1.5 and abs(by - y0) < 1.5 and abs(bw - (x1 - x0)) < 1.5 and abs(bh - (y1 - y0)) < 1.5
    )
    answered = by_type(box_answer["data"]["result"])
    assert "rectanglelabels" not in answered  # the control drawn with gets nothing back
    assert answered["brushlabels"][0]["value"]["brushlabels"] == ["Yellow"]
    mask = brush_mask(answered["brushlabels"][0])
    rows, cols = np.nonzero(mask)
    assert cols.min() >= int(bx * SIDE / 100) - 1 and cols.max() <= int((bx + bw) * SIDE / 100) + 1
    assert rows.min() >= int(by * SIDE / 100) - 1 and rows.max() <= int((by + bh) * SIDE / 100) + 1
    assert iou(mask, yellow) > MIN_IOU
    page.page.get_by_test_id("bottombar-reject-suggestions-button").click()

    # A positive smart key point in the yellow shape, then a negative one on the background: Label Studio
    # sends both, SAM answers both together.
    page.choose_label("Yellow", control=0)
    page.choose_smart_tool("key-point-tool")
    with page.answer() as positive:
        page.click_image(*percent(*interior_point(yellow)))
    (point,) = positive["context"]["result"]
    assert point["type"] == "keypointlabels" and point["is_positive"] is True
    first = by_type(positive["data"]["result"])
    assert set(first) == {"rectanglelabels", "brushlabels"}  # every control but the key points'
    assert brush_mask(first["brushlabels"][0])[pixel(point["value"]["x"], point["value"]["y"])]
    assert iou(brush_mask(first["brushlabels"][0]), yellow) > MIN_IOU
    page.wait_for_suggestions()

    background = scene_mask(scene.labels == 0)
    page.choose_label("Yellow", control=0)  # Label Studio deselects the label after each point
    with page.answer() as negative:
        page.click_image(*percent(*interior_point(background)), negative=True)
    sent = negative["context"]["result"]
    assert [p["is_positive"] for p in sent] == [True, False]
    (after,) = by_type(negative["data"]["result"])["brushlabels"]
    neg = sent[1]["value"]
    assert not brush_mask(after)[pixel(neg["x"], neg["y"])]
    assert iou(brush_mask(after), yellow) > MIN_IOU
    page.wait_for_suggestions()
    page.screenshot("smart-clicks")


def test_referring_expression_gets_one_region_on_the_shape_labelled_by_the_rule(
    page, ls, tiny_backend, screenshots
):
    config = docs_config("referring", {"Person": "Yellow", "Car": "Purple"})
    (scene,) = scenes_with(["purple", "yellow"], SEEDS["referring"])
    project, (task,) = make_project(ls, tiny_backend, "browser referring", config, [scene])
    page.open_task(project, task)
    page.enable_auto_annotation(auto_accept=True)
    with page.answer() as answer:
        page.type_prompt("the purple shape")
    assert "-expressions" in answer["data"]["model_version"]  # GEM stands in for LAVT
    page.page.wait_for_function(
        "() => window.Htx.annotationStore.selected.regions.some(r => r.type === 'polygonregion')"
    )
    results = page.results()
    polygons = by_type(results)["polygonlabels"]
    # One region; "Purple" is named in the sentence, although "Yellow" is the control's first label.
    assert [r["value"]["polygonlabels"] for r in polygons] == [["Purple"]]
    assert iou(labelled(results, "polygonlabels", "Purple"), truth(scene, "purple")) > MIN_IOU
    assert page.region_list() == ["Purple"]
    page.page.locator(".lsf-outliner-item__title", has_text="Purple").click()  # its details in the side panel
    page.screenshot("referring-expression")


def test_retrieve_predictions_accept_and_export_to_coco(page, ls, tiny_backend, screenshots, tmp_path):
    config = docs_config("typed-prompt", {"Car": "Blue", "Person": "Yellow"})
    scenes = scenes_with(["blue", "yellow"], SEEDS["retrieve"], count=3)
    project, ids = make_project(ls, tiny_backend, "browser retrieve", config, scenes, prelabel=True)
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
    for task_id, scene in zip(ids, scenes, strict=True):  # each label's brush and polygon on its shape
        result = stored[task_id][0]["result"]
        for label in ("Blue", "Yellow"):
            for kind in ("brushlabels", "polygonlabels"):
                assert iou(labelled(result, kind, label), truth(scene, label.lower())) > MIN_IOU, (
                    kind,
                    label,
                )

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
    assert (image["width"], image["height"]) == (SIDE, SIDE)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    regions = [r for r in shown if r["type"] in ("polygonlabels", "brushlabels")]
    assert len(anns) == len(regions)
    assert sorted(names[a["category_id"]] for a in anns) == sorted(kind_and_label(r)[1] for r in regions)
    for region in regions:  # each region's box, in pixels, is one of the COCO boxes
        if region["type"] == "polygonlabels":
            xs = [pt[0] * SIDE / 100 for pt in region["value"]["points"]]
            ys = [pt[1] * SIDE / 100 for pt in region["value"]["points"]]
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
