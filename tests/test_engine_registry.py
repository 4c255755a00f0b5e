"""The engine registry: an engine defined and registered here, and nowhere else, answers through the job
path, ``groundlabel predict`` and ``groundlabel prelabel``; the kernel declares the built-in engines the
registry holds; an unknown engine is refused at ``/setup`` and ``/predict`` with the known ones."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, png_bytes, png_data_uri  # noqa: E402

from groundlabel import spec as kernel_spec  # noqa: E402
from groundlabel.settings import Settings  # noqa: E402
from groundlabel.spec import parse_label_config, read_spec  # noqa: E402
from groundlabel.versions import versioned  # noqa: E402
from groundlabel_cli.main import main  # noqa: E402
from workers import engines, registry  # noqa: E402
from workers.inprocess import InProcessRunner  # noqa: E402
from workers.jobs import run_job  # noqa: E402
from workers.registry import INSTANCES, EngineEntry, register_engine, unregister_engine  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" engine="squares">
    <Label value="Cat" predicted_values="cat,kitten"/><Label value="Dog"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image" engine="squares"><Label value="Cat"/></RectangleLabels>
</View>"""


@dataclass
class Square:
    """One object found: the prompt that found it, its score and its mask."""

    prompt: str
    group: object
    score: float
    mask: np.ndarray
    box: tuple[float, float, float, float]


class SquaresEngine:
    """Finds one centred square per prompt, scored 0.9: an engine answering instances."""

    model_version = "squares-1"

    def instances(self, images, prompts, groups=None, min_score=0.0):
        out = []
        for image in images:
            w, h = image.size
            mask = np.zeros((h, w), dtype=bool)
            mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
            box = (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
            out.append([Square(p, (groups or prompts)[i], 0.9, mask, box) for i, p in enumerate(prompts)])
        return out


@pytest.fixture
def squares():
    """The engine ``squares`` in the registry for one test."""
    register_engine(
        EngineEntry(
            "squares",
            frozenset({INSTANCES}),
            "none",
            build=lambda _engines: SquaresEngine(),
            version=lambda _engines: "squares-1",
        )
    )
    engines.configure(Settings.from_env({"GROUNDLABEL_DEVICE": "cpu"}))
    engines.set_engine("gem", make_tiny_gem_engine())  # a job always holds the score-map engine
    yield
    unregister_engine("squares")
    engines.configure(Settings())


def _regions(prediction: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in prediction["result"]:
        out.setdefault(r["from_name"], []).append(r)
    return out


def _check(prediction: dict, version: str = "squares-1") -> None:
    assert prediction["model_version"] == version, prediction
    regions = _regions(prediction)
    assert sorted(r["value"]["polygonlabels"][0] for r in regions["poly"]) == ["Cat", "Cat", "Dog"]
    assert [r["value"]["rectanglelabels"] for r in regions["box"]] == [["Cat"]]  # its Cat: "cat" alone
    box = regions["box"][0]["value"]
    assert box["x"] == pytest.approx(25, abs=3) and box["width"] == pytest.approx(50, abs=3)
    assert {r["score"] for r in prediction["result"]} == {0.9}


def test_the_kernel_declares_the_built_in_engines_of_the_registry():
    assert registry.class_engines() == list(kernel_spec.BUILTIN_ENGINES)
    assert list(kernel_spec.BUILTIN_ENGINES) == kernel_spec.CLASS_ENGINES


def test_a_registered_engine_answers_through_the_job_path(squares):
    task = {"id": 1, "data": {"image": png_data_uri(64, 48)}}
    (prediction,) = run_job({"tasks": [task], "spec": parse_label_config(CONFIG).to_dict()})
    _check(prediction)


def test_a_registered_engine_answers_through_predict(squares, tmp_path: Path):
    image, config, out = tmp_path / "a.png", tmp_path / "config.xml", tmp_path / "tasks.json"
    image.write_bytes(png_bytes(64, 48))
    config.write_text(CONFIG, encoding="utf-8")
    code = main(["predict", str(image), "--label-config", str(config), "--out", str(out), "--no-progress"])
    assert code == 0
    ((prediction,),) = [t["predictions"] for t in json.loads(out.read_text())]
    _check(prediction)


class _ThreadRunner(InProcessRunner):
    """The in-process runner with its jobs on a thread of this process, where the engine is registered
    (configured with the command's settings, as its children are; the tiny GEM kept)."""

    def _new_pool(self):
        gem = engines.get_gem_engine()
        engines.configure(self.settings)
        engines.set_engine("gem", gem)
        return ThreadPoolExecutor(max_workers=1)


@pytest.mark.slow
@pytest.mark.integration
def test_a_registered_engine_answers_through_prelabel(squares, monkeypatch):
    """``groundlabel prelabel`` against a real Label Studio writes the engine's regions into the task."""
    from labelstudio_server import require_label_studio, shared_label_studio

    import groundlabel_cli.prelabel as prelabel_verb

    require_label_studio()
    studio = shared_label_studio()
    project = studio.create_project("registered engine", CONFIG)
    folder = f"engine{project}"
    studio.add_local_storage(project, folder)
    (studio.files_root / folder / "a.png").write_bytes(png_bytes(64, 48))
    (task_id,) = studio.import_tasks(project, [{"image": f"/data/local-files/?d={folder}/a.png"}])
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", studio.url)  # the job fetches the task's image from it
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", studio.legacy_token)
    monkeypatch.setattr(prelabel_verb, "make_runner", lambda s: _ThreadRunner(s, 1, warm_up=False))
    args = ["prelabel", "--project", str(project), "--url", studio.url, "--api-key", studio.legacy_token]
    assert main([*args, "--no-progress"]) == 0
    (prediction,) = studio.predictions(task_id)
    _check(prediction, versioned("squares-1", read_spec(CONFIG, Settings.from_env({}))))  # as serve names it
    # A second run finds the task's prediction current and writes none.
    assert main([*args, "--no-progress"]) == 0
    assert len(studio.predictions(task_id)) == 1


def test_an_unknown_engine_is_refused_with_the_known_ones():
    from fastapi.testclient import TestClient

    from labeling_backend.app import create_app

    class NoJobs:
        where = "nowhere"

        def stats(self):
            return {}

        def close(self):
            pass

    bad = CONFIG.replace('engine="squares"', 'engine="nope"')
    with TestClient(create_app(Settings.from_env({}), runner=NoJobs(), model_version="gem-x")) as client:
        r = client.post("/setup", json={"project": "7", "schema": bad})
        assert r.status_code == 400 and "engine='nope' is not one of gem, sam3" in r.json()["detail"]
        task = {"id": 1, "data": {"image": "a.png"}}
        r = client.post("/predict", json={"tasks": [task], "label_config": bad})
        assert r.status_code == 400 and "engine='nope' is not one of gem, sam3" in r.json()["detail"]
