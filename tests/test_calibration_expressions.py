"""Calibration of typed referring expressions: one choice per project between LAVT and GEM grounding the
expression, with its threshold, by overall IoU on the tuning images; the record keeps it, checked, and a
worker serves a promoted calibration's expressions through the chosen engine at the chosen threshold."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from groundlabel.calibration import Calibration, ExpressionChoice, LabelChoice, parse_calibration
from groundlabel.errors import UserError
from workers.calibration import ExpressionSample, calibrate_expressions

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def scenes(n: int, seed: int = 0):
    """Expressions on 24x24 images: the named square, a map that finds it cleanly (scores 0.7 inside, 0.2
    outside, some noise) and one that spills over a distractor scoring as high as the target."""
    rng = np.random.default_rng(seed)
    samples, maps = [], {}
    for k in range(n):
        mask = np.zeros((24, 24), bool)
        y, x = rng.integers(0, 12, size=2)
        mask[y : y + 8, x : x + 8] = True
        clean = np.where(mask, 0.7, 0.2) + rng.uniform(-0.05, 0.05, mask.shape)
        spill = np.where(mask, 0.9, 0.1)
        spill[(y + 12) % 24 : (y + 12) % 24 + 6, :10] = 0.9  # the distractor
        key = f"image-{k}"
        maps[("clean", key)], maps[("spill", key)] = clean, spill
        samples.append(ExpressionSample(key, "the square", mask, "train" if k % 3 else "val"))
    return samples, maps


def oiou(pairs) -> float:
    inter = sum(float((p & g).sum()) for p, g in pairs)
    return inter / sum(float((p | g).sum()) for p, g in pairs)


@pytest.mark.parametrize("good", ["lavt", "gem"])
def test_the_expression_choice_is_the_engine_and_threshold_of_best_tuning_oiou(good):
    other = "gem" if good == "lavt" else "lavt"
    samples, maps = scenes(9)
    engine_map = {good: "clean", other: "spill"}

    def answer(engine, image, expression):
        assert expression == "the square"
        return maps[(engine_map[engine], image)]

    current = ExpressionChoice("lavt", 0.5)
    result = calibrate_expressions(samples, answer, ["lavt", "gem"], current=current)
    assert result.choice.engine == good and not result.choice.sam
    assert 0.25 < result.choice.threshold <= 0.65  # between the clean map's outside and inside scores
    for split in ("train", "val"):  # the pooled figure is the oIoU of the masks served at the threshold
        part = [s for s in samples if s.split == split]
        for choice in (result.choice, current):
            masks = [(answer(choice.engine, s.image, s.expression) >= choice.threshold, s.mask) for s in part]
            assert result.oiou(choice, split) == pytest.approx(oiou(masks))
    assert result.oiou(result.choice, "val") == pytest.approx(1.0)
    metrics = result.metrics()
    assert metrics["new"]["engine"] == good and metrics["base"] == {
        "engine": "lavt",
        "threshold": 0.5,
        "sam": False,
        "oIoU": result.oiou(current, "val"),
        "tuning_oIoU": result.oiou(current, "train"),
    }


def test_a_tie_keeps_what_is_served():
    samples, maps = scenes(6)
    current = ExpressionChoice("gem", 0.5)
    result = calibrate_expressions(
        samples, lambda e, image, x: maps[("clean", image)], ["lavt", "gem"], current=current
    )
    assert result.choice == current


def test_the_record_keeps_the_expression_choice_and_checks_it():
    record = Calibration([LabelChoice("mask", "red", "gem", 0.3)], None, ExpressionChoice("gem", 0.42, True))
    assert parse_calibration(json.loads(json.dumps(record.to_dict()))) == record
    assert "expressions" not in Calibration([]).to_dict()  # records without one read as before
    assert parse_calibration({"choices": [], "expressions": None}).expressions is None
    for bad in (
        [],
        {"engine": "sam3", "threshold": 0.5},
        {"engine": "lavt", "threshold": 2},
        {"engine": "lavt", "threshold": 0.5, "sam": "yes"},
    ):
        with pytest.raises(UserError, match="not a valid calibration.*expressions"):
            parse_calibration({"choices": [], "expressions": bad})


# -- a worker serving the choice ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")

from test_lavt_jobs import fresh_engines, lavt_checkpoint, payload, predict_tasks  # noqa: E402,F401


def store_calibration(root, expressions: ExpressionChoice) -> str:
    from groundlabel.model_store import ModelStore

    store = ModelStore(root)
    file = root.parent / "calibration.json"
    file.write_text(json.dumps(Calibration([], None, expressions).to_dict()), encoding="utf-8")
    version = store.add(project="9", kind="calibration", variant="gem", weights=file, parent=None,
                        annotation_count=2)  # fmt: skip
    store.promote("9", version.name, "test")
    return version.name


def brush_area(prediction: dict) -> int:
    from groundlabel.ls_format import brush_rle_decode

    return sum(
        int(np.count_nonzero(brush_rle_decode(r["value"]["rle"], r["original_height"], r["original_width"])))
        for r in prediction["result"]
        if r["type"] == "brushlabels"
    )


def test_a_promoted_calibration_answers_expressions_with_its_engine_and_threshold(
    fresh_engines,  # noqa: F811  (the LAVT job tests' fixtures)
    lavt_checkpoint,  # noqa: F811
    tmp_path,
):
    from test_lavt_jobs import png_data_uri

    fresh_engines.setenv("GROUNDLABEL_LAVT_CHECKPOINT", str(lavt_checkpoint))
    fresh_engines.setenv("GROUNDLABEL_MODEL_STORE", str(tmp_path / "store"))
    tasks = [{"id": 1, "data": {"image": png_data_uri(48, 40, seed=1), "expression": "the red square"}}]
    job = payload(tasks)
    job["project"] = "9"
    (plain,) = predict_tasks(dict(job, project="8"))  # another project: LAVT at its own threshold
    assert plain["model_version"] == "lavt-tiny-shapes-tiny" and brush_area(plain) > 0

    store_calibration(tmp_path / "store", ExpressionChoice("gem", 0.0))  # GEM, every pixel kept
    (gem,) = predict_tasks(job)
    assert gem["model_version"].startswith("gem-tinyclip") and "lavt" not in gem["model_version"]
    assert brush_area(gem) == 48 * 40

    store_calibration(tmp_path / "store", ExpressionChoice("lavt", 1.0))  # LAVT, at a threshold none reach
    (lavt,) = predict_tasks(job)
    assert lavt["model_version"] == "lavt-tiny-shapes-tiny" and "error" not in lavt
    assert brush_area(lavt) < brush_area(plain)


@pytest.mark.slow
def test_calibrating_a_project_with_expressions_stores_and_serves_the_expression_choice(
    lavt_checkpoint,  # noqa: F811
    tmp_path,
):
    from dataclasses import replace

    from test_calibration import _settings
    from test_training_gem import CONFIG, scene_export, tiny_engines

    from groundlabel.model_store import ModelStore
    from groundlabel_cli.calibrate import calibrate_project
    from workers import engines

    tasks, root = scene_export(tmp_path, 24)
    for task in tasks:  # one region per task, named by the task's expression
        (region,) = task["annotations"][0]["result"][:1]
        task["annotations"][0]["result"] = [region]
        task["data"]["expression"] = f"the {region['value']['brushlabels'][0]} shape"
    config = CONFIG.replace("</View>", '<TextArea name="prompt" toName="image" value="$expression"/></View>')
    engine_settings, _ = tiny_engines(tmp_path)
    settings = _settings(
        tmp_path, root, replace(engine_settings, lavt_enabled=True, lavt_checkpoint=str(lavt_checkpoint))
    )
    engines.configure(settings)
    store = ModelStore(tmp_path / "store")
    try:
        outcome = calibrate_project("5", settings, store, annotations=(tasks, config), variants=["gem"])
        figures = outcome.metrics["expressions"]
        assert figures["variants"] == ["lavt", "gem"]
        assert figures["new"]["tuning_oIoU"] >= figures["base"]["tuning_oIoU"] - 1e-9
        assert figures["base"]["engine"] == "lavt" and figures["base"]["threshold"] == 0.5
        chosen = store.calibration(store.get("5", outcome.version)).expressions
        assert chosen is not None and chosen.engine == figures["new"]["engine"]
        assert chosen.threshold == figures["new"]["threshold"]
        metrics = outcome.metrics
        new = metrics["new"]["per_label"].values()
        expected = np.mean([*(v for v in new if v is not None), figures["new"]["oIoU"]])
        assert outcome.promoted == (expected > with_expressions_base(metrics, figures))  # min gain 0

        # the workers answer the project's expressions with the chosen engine once it is promoted
        from groundlabel.protocol import JobPayload
        from groundlabel.spec import read_spec
        from workers.jobs import run_prediction_job

        if not outcome.promoted:
            store.promote("5", outcome.version, "by hand, for the serving check")
        job = [{"id": t["id"], "data": t["data"]} for t in tasks[:2]]
        served = run_prediction_job(JobPayload(job, read_spec(config, settings), project="5"))
        prefix = "lavt-" if chosen.engine == "lavt" else "gem-"
        assert all(p["model_version"].startswith(prefix) for p in served), served
    finally:
        engines.configure(type(settings)())


def with_expressions_base(metrics: dict, figures: dict) -> float:
    """The held-out figure the calibration is compared with: the labels served now and the expressions."""
    base = [v for v in metrics["base"]["per_label"].values() if v is not None]
    return float(np.mean([*base, figures["base"]["oIoU"]]))
