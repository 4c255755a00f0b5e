"""End to end with a real Label Studio: the ML backend connected through ``/api/ml``, and ``prelabel``.

Label Studio (``tests/labelstudio_server.py``) runs headless on SQLite; ``groundlabel serve`` runs as a
subprocess with GEM on a tiny random-weight CLIP in one in-process worker, downloading images from Label
Studio with a personal access token; ``groundlabel prelabel`` runs as a subprocess with the legacy token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env, png_bytes, serve_process
from labelstudio_server import PROJECT_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LABELS = {("poly", "polygonlabels"): {"Thing", "Other"}, ("mask", "brushlabels"): {"Thing"}}
MODEL_VERSION = "gem-tinyclip-random-64"  # the tiny model runs at 64 px


@pytest.fixture(scope="module")
def label_studio(label_studio_session):
    return label_studio_session


@pytest.fixture(scope="module")
def backend(serve_backend):
    """``groundlabel serve`` on the tiny model, connected to the session's Label Studio."""
    return serve_backend


def _make_project(
    label_studio, title: str, n: int, config: str = PROJECT_CONFIG
) -> tuple[int, list[int]]:
    project = label_studio.create_project(title, config)
    folder = f"e2e{project}"
    label_studio.add_local_storage(project, folder)
    tasks = []
    for i in range(n):
        Path(label_studio.files_root, folder, f"img{i}.png").write_bytes(png_bytes(48 + 8 * i, 36, seed=i))
        tasks.append({"image": f"/data/local-files/?d={folder}/img{i}.png"})
    ids = label_studio.import_tasks(project, tasks)
    assert len(ids) == n
    return project, ids


def _check_predictions(label_studio, ids: list[int], model_version: str) -> dict[int, int]:
    """Exactly one prediction per task, of ``model_version``, with regions of the configured controls."""
    prediction_ids = {}
    for task_id in ids:
        predictions = label_studio.predictions(task_id)
        assert len(predictions) == 1, (task_id, predictions)
        prediction = predictions[0]
        assert prediction["model_version"].rsplit("-cfg", 1)[0] == model_version  # + the label config tag
        assert prediction["result"], f"task {task_id}: no region at threshold 0"
        seen = set()
        for region in prediction["result"]:
            key = (region["from_name"], region["type"])
            assert key in LABELS, region
            assert region["to_name"] == "image"
            assert set(region["value"][region["type"]]) <= LABELS[key]
            assert region["original_width"] > 0 and region["original_height"] == 36
            seen.add(key)
        assert seen == set(LABELS), f"task {task_id}: regions only for {seen}"
        prediction_ids[task_id] = prediction["id"]
    return prediction_ids


def _connect_and_retrieve(label_studio, backend: str, project: int) -> None:
    """Connect the backend to the project through ``/api/ml`` and run *Retrieve Predictions* on every task."""
    ml = label_studio.api_json(
        "POST",
        "/api/ml",
        json={"url": backend, "project": project, "title": "groundlabel", "is_interactive": False},
    )
    assert ml["id"] and ml.get("state") != "ER", ml
    label_studio.retrieve_predictions(project)


def test_backend_connected_to_label_studio(label_studio, backend):
    project, ids = _make_project(label_studio, "e2e backend", 3)
    _connect_and_retrieve(label_studio, backend, project)
    _check_predictions(label_studio, ids, MODEL_VERSION)
    # Asking again stores nothing new: Label Studio skips tasks predicted by the backend's version.
    label_studio.retrieve_predictions(project)
    _check_predictions(label_studio, ids, MODEL_VERSION)


def test_prelabel_command_and_resume(label_studio, tiny_gem_env):
    project, ids = _make_project(label_studio, "e2e prelabel", 3)
    env = clean_env({**tiny_gem_env, "LABEL_STUDIO_API_KEY": label_studio.legacy_token})
    argv = [
        sys.executable,
        "-m",
        "groundlabel",
        "prelabel",
        "--project",
        str(project),
        "--url",
        label_studio.url,
    ]
    first = subprocess.run([*argv, "--chunk-size", "2"], env=env, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "done:    3" in first.stdout and "failed:  0" in first.stdout
    stored = _check_predictions(label_studio, ids, MODEL_VERSION)

    again = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert "done:    0" in again.stdout and "skipped: 3" in again.stdout
    assert _check_predictions(label_studio, ids, MODEL_VERSION) == stored


def test_serve_and_prelabel_agree_under_a_default_threshold(label_studio, tiny_gem_env, tmp_path):
    """With GROUNDLABEL_DEFAULT_THRESHOLD set and a config whose controls set no threshold, ``serve`` and
    ``prelabel`` read the same spec: the same model version, so prelabel skips every task serve predicted."""
    config = PROJECT_CONFIG.replace(' model_score_threshold="0.0"', "")
    assert "model_score_threshold" not in config
    project, ids = _make_project(label_studio, "e2e default threshold", 2, config)
    env = clean_env(
        {
            **tiny_gem_env,
            "GROUNDLABEL_DEFAULT_THRESHOLD": "0.0",
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.personal_access_token(),
        }
    )
    with serve_process(env, tmp_path / "serve.log") as backend:
        _connect_and_retrieve(label_studio, backend, project)
    stored = _check_predictions(label_studio, ids, MODEL_VERSION)
    (served,) = {label_studio.predictions(t)[0]["model_version"] for t in ids}

    argv = [sys.executable, "-m", "groundlabel", "prelabel", "--project", str(project)]
    run = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert f"model version {served}:" in run.stdout, (served, run.stdout)
    assert "done:    0" in run.stdout and "skipped: 2" in run.stdout
    assert _check_predictions(label_studio, ids, MODEL_VERSION) == stored  # no second prediction
