"""Calibration from corrections: the record and its checks, the model store's ``calibration`` versions, the
sweep on generated scenes with the in-repo tiny CLIP, the promotion rule, and a worker serving a promoted
calibration to its project only (then the project's old settings again after a rollback)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from groundlabel.calibration import VARIANTS, Calibration, LabelChoice, parse_calibration
from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore, StoreFileError, version_summary
from groundlabel.versions import replaced_by

torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from test_training_gem import CONFIG, scene_export, tiny_engines  # noqa: E402


def write_calibration(path: Path, choices: list[LabelChoice]) -> Path:
    path.write_text(json.dumps(Calibration(choices).to_dict()), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"choices": {}},
        {"choices": [{"control": "mask", "label": "red", "variant": "yolo", "threshold": 0.5}]},
        {"choices": [{"control": "mask", "label": "red", "variant": "gem", "threshold": 1.5}]},
        {"choices": [{"control": "mask", "label": "red", "variant": "gem", "threshold": True}]},
        {"choices": [{"control": "mask", "label": 3, "variant": "gem", "threshold": 0.5}]},
        {"choices": [], "trained": ["x"]},
    ],
)
def test_a_calibration_record_is_checked_field_by_field(data):
    with pytest.raises(UserError, match="not a valid calibration"):
        parse_calibration(data, "c.json")


def test_the_store_keeps_calibrations_as_json_versions_and_refuses_other_files(tmp_path):
    store = ModelStore(tmp_path / "store")
    file = write_calibration(tmp_path / "c.json", [LabelChoice("mask", "red", "gem+pamr", 0.3)])
    version = store.add(
        project="4",
        kind="calibration",
        variant="gem",
        weights=file,
        parent="gem-base",
        annotation_count=3,
        metrics={"base": {"mIoU": 20.0}, "new": {"mIoU": 30.0}},
    )
    assert version.name == "calibration-gem-p4-v1" and version.weights == "calibration.json"
    assert store.calibration(store.get("4", version.name)).choices == [
        LabelChoice("mask", "red", "gem+pamr", 0.3)
    ]
    summary = version_summary(version, None)
    assert summary["kind"] == "calibration" and summary["heldout_mIoU"] == 30.0
    with pytest.raises(UserError):  # anything but a calibration record is refused as one
        store.add(project="4", kind="calibration", variant="gem", weights=REPO / "README.md", parent=None,
                  annotation_count=0)  # fmt: skip
    # a file in the store rewritten by someone else is an error of that project, named
    (tmp_path / "store/4" / version.name / "calibration.json").write_text('{"choices": [1]}')
    with pytest.raises(StoreFileError, match="choice 0 is not an object"):
        store.calibration(store.get("4", version.name))
    assert replaced_by("calibration", "gem-ViT-B-16-openai") and replaced_by("calibration", "sam3")
    assert not replaced_by("calibration", "gem-ViT-B-16-openai-expressions")
    assert not replaced_by("calibration", "lavt-swin_b-refcoco")


def safetensors_file(path: Path) -> Path:
    """A small safetensors file (a version's weights need not fit a model to be listed or promoted)."""
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, np.float32)}, str(path))
    return path


def _settings(tmp_path, root: str, engines):
    from groundlabel.settings import Settings

    s = Settings()
    return replace(
        s,
        engines=engines,
        training=replace(s.training, model_store=str(tmp_path / "store"), holdout=0.3),
        fetch=replace(s.fetch, local_files_root=root),
    )


@pytest.mark.slow
def test_calibrating_scenes_chooses_per_label_is_promoted_only_when_better_and_workers_serve_it(tmp_path):
    from groundlabel.protocol import JobPayload
    from groundlabel.spec import read_spec
    from groundlabel_cli.calibrate import calibrate_project
    from workers import engines
    from workers.jobs import run_prediction_job

    tasks, root = scene_export(tmp_path, 24)
    engine_settings, _ = tiny_engines(tmp_path)
    settings = _settings(tmp_path, root, engine_settings)
    engines.configure(settings)
    store = ModelStore(tmp_path / "store")
    try:
        first = calibrate_project("5", settings, store, annotations=(tasks, CONFIG), variants=["gem"])
        metrics = first.metrics
        # the choice is the best on the tuning images, so it is never worse there than what it replaces
        assert metrics["new"]["tuning_IoU"] >= metrics["base"]["tuning_IoU"] - 1e-9
        assert metrics["new"]["tuning_IoU"] >= metrics["global_threshold"]["tuning_IoU"] - 1e-9
        assert metrics["tuning_images"] > 0 and metrics["heldout_images"] > 0
        assert first.promoted == (metrics["new"]["IoU"] > metrics["base"]["IoU"])
        record = store.get("5", first.version)
        assert record.kind == "calibration" and record.annotation_count == 24
        assert {c.variant for c in store.calibration(record).choices} <= set(VARIANTS)
        if not first.promoted:
            store.promote("5", first.version, "by hand, for the serving check")

        # calibrating again over the promoted calibration finds the same choices: stored, not promoted
        second = calibrate_project("5", settings, store, annotations=(tasks, CONFIG), variants=["gem"])
        assert not second.promoted and "not promoted" in second.reason
        assert store.promoted_name("5") == first.version
        assert second.metrics["new"]["IoU"] == pytest.approx(second.metrics["base"]["IoU"])

        # a worker serves the calibration to its project, named after it; another project keeps GEM
        spec = read_spec(CONFIG, settings)
        job = [{"id": t["id"], "data": t["data"]} for t in tasks[:3]]
        served = run_prediction_job(JobPayload(job, spec, project="5"))
        other = run_prediction_job(JobPayload(job, spec, project="6"))
        assert {p["model_version"] for p in served} == {first.version}, [p.get("error") for p in served]
        assert all(p["model_version"].startswith("gem-") for p in other)
        calibration = store.calibration(record)
        for prediction in served:  # every region's label was answered at its calibrated threshold
            for result in prediction["result"]:
                label = result["value"]["brushlabels"][0]
                assert calibration.choice("mask", label) is not None
        assert served != other or all(not p["result"] for p in served)
        store.rollback("5")
        again = run_prediction_job(JobPayload(job, spec, project="5"))
        assert [p["model_version"] for p in again] == [p["model_version"] for p in other]
    finally:
        engines.configure(type(settings)())


def test_a_project_without_a_held_out_image_is_refused(tmp_path):
    from groundlabel_cli.calibrate import calibrate_project

    tasks, root = scene_export(tmp_path, 1)
    engine_settings, _ = tiny_engines(tmp_path)
    settings = _settings(tmp_path, root, engine_settings)
    with pytest.raises(UserError, match="both parts need at least one"):
        calibrate_project("5", settings, ModelStore(tmp_path / "store"), annotations=(tasks, CONFIG))
    assert np.array(ModelStore(tmp_path / "store").projects()).size == 0


@pytest.mark.integration
def test_the_backend_announces_and_lists_a_promoted_calibration(redis_url, tmp_path):
    from fastapi.testclient import TestClient

    from groundlabel.settings import Settings
    from labeling_backend.app import create_app

    base = "gem-test-base"
    store = ModelStore(tmp_path / "store")
    file = write_calibration(tmp_path / "c.json", [LabelChoice("mask", "red", "gem", 0.3)])
    version = store.add(
        project="5", kind="calibration", variant="gem", weights=file, parent=base, annotation_count=2,
        metrics={"base": {"IoU": 0.2, "mIoU": 20.0}, "new": {"IoU": 0.3, "mIoU": 30.0}},
    )  # fmt: skip
    settings = Settings.from_env({}, redis_url=redis_url, model_store=str(store.root))
    with TestClient(create_app(settings, model_version=base)) as client:
        setup = {"project": "5.1700000000", "schema": CONFIG, "hostname": "http://ls"}
        assert client.post("/setup", json=setup).json()["model_version"].startswith(base + "-cfg")
        store.promote("5", version.name, "test")
        announced = client.post("/setup", json=setup).json()["model_version"]
        assert announced.startswith(f"{version.name}-cfg"), announced
        other = {**setup, "project": "6.1700000000"}
        assert client.post("/setup", json=other).json()["model_version"].startswith(base)
        listed = client.get("/versions", params={"project": "5"}).json()
        assert version.name in listed["versions"]
        detail = next(d for d in listed["details"] if d["name"] == version.name)
        assert detail["kind"] == "calibration" and detail["promoted"] and detail["heldout_mIoU"] == 30.0
        store.rollback("5")
        assert client.post("/setup", json=setup).json()["model_version"].startswith(base)

        # a calibration over a distilled GEM: its name for the class prompts, the GEM's for the rest
        from labeling_backend.routes import _dispatcher

        gem = store.add(
            project="5", kind="gem", variant="tiny", weights=safetensors_file(tmp_path / "w.safetensors"),
            parent=base, annotation_count=2,
        )  # fmt: skip
        over = tmp_path / "over.json"
        over.write_text(json.dumps(Calibration([LabelChoice("mask", "red", "gem", 0.3)], gem.name).to_dict()))
        calibrated = store.add(
            project="5", kind="calibration", variant="gem", weights=over, parent=gem.name, annotation_count=2
        )
        store.promote("5", calibrated.name, "test")
        assert store.served_trained("5").name == gem.name
        names = _dispatcher(client.app.state.backend, "5").versions
        assert names[:3] == [calibrated.name, gem.name, gem.name + "-expressions"] and base not in names


@pytest.mark.slow
def test_the_sweep_counts_what_the_served_masks_give_for_gem_pamr_and_sam3(tmp_path):
    """The sweep's pooled IoU at a threshold is the IoU of the masks served at that threshold
    (:func:`workers.calibration.label_mask` on GEM's and GEM + PAMR's maps, the instances kept for SAM 3),
    recomputed here image by image; and a label calibrated to SAM 3 is served exactly its instances."""
    from sam3_tiny import tiny_sam3_engine

    from groundlabel.spec import read_spec
    from workers.calibration import (
        Sample,
        calibrate,
        calibrated_regions,
        instances_mask,
        label_mask,
        with_refine,
    )
    from workers.evaluation.scenes import COLOURS, make_scenes
    from workers.pipeline import PromptMaps, prompt_groups
    from workers.regions import control_model
    from workers.registry import gem_config, new_gem_engine

    engine_settings, _ = tiny_engines(tmp_path)
    gem = new_gem_engine(gem_config(engine_settings, register=True), engine_settings)
    sam3 = tiny_sam3_engine()  # random weights: instances of every score
    classes = list(COLOURS)
    spec = read_spec(CONFIG)
    control = spec.controls[0]
    samples = [
        Sample(scene.image.convert("RGB"), {n: scene.colour_labels == k + 1 for k, n in enumerate(classes)},
               "train" if i < 4 else "val")
        for i, scene in enumerate(make_scenes(6, 5, 48))
    ]  # fmt: skip
    by_name = {"gem": gem, "gem+pamr": with_refine(gem, "pamr"), "sam3": sam3}
    current = lambda c, lab: ("gem", 0.5)  # noqa: E731
    get = by_name.__getitem__
    result = calibrate(spec, samples, get, list(by_name), current=current, default_threshold=0.5)
    prompts, groups = prompt_groups(spec)
    model = control_model(control)
    checked = 0
    for variant, threshold in (("gem", 0.3), ("gem+pamr", 0.6), ("sam3", 0.1)):
        inter = dict.fromkeys(classes, 0)
        union = dict.fromkeys(classes, 0)
        for s in samples[4:]:
            shape = (s.image.height, s.image.width)
            if variant == "sam3":
                (found,) = sam3.instances([s.image], prompts, groups=groups, min_score=0.02)
                masks = {
                    lab: instances_mask(found, control.prompts[lab], threshold, shape) for lab in classes
                }
            else:
                (raw,) = by_name[variant].heatmaps([s.image], prompts, groups=groups)
                best, index = model.best_label(PromptMaps(prompts, raw), width=shape[1], height=shape[0])
                masks = {lab: label_mask(best, index, i, threshold) for i, lab in enumerate(classes)}
            for lab in classes:
                inter[lab] += int((masks[lab] & s.masks[lab]).sum())
                union[lab] += int((masks[lab] | s.masks[lab]).sum())
        for lab in classes:
            if union[lab]:
                swept = result.counts[(control.name, lab, variant)].iou("val", threshold)
                assert swept == pytest.approx(inter[lab] / union[lab]), (variant, lab)
                checked += 1
    assert checked >= 3 * 4

    calibration = Calibration([LabelChoice("mask", "red", "sam3", 0.1)])
    (regions,) = calibrated_regions(
        spec, [samples[0].image], calibration, by_name.__getitem__, current=lambda c: "gem", version="cal-v1"
    )
    (found,) = sam3.instances([samples[0].image], prompts, groups=groups, min_score=0.02)
    red = [i for i in found if i.prompt in control.prompts["red"] and i.score >= 0.1]
    served_red = [r for r in regions.results if r["value"]["brushlabels"] == ["red"]]
    assert regions.model_version == "cal-v1" and len(served_red) == len(red)
