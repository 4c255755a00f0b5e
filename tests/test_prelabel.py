"""``groundlabel prelabel``: planning, the CLI's errors, and whole runs against a real Label Studio.

The runs use the backend's in-process job runner (a spawned child process running GEM on a tiny CLIP with
random weights) and the real Label Studio of ``tests/labelstudio_server.py``.
"""

from __future__ import annotations

import pytest
from conftest import png_bytes
from labelstudio_server import PROJECT_CONFIG, require_label_studio, shared_label_studio

from groundlabel.errors import UserError
from groundlabel.ls_client import (
    LabelStudioError,
    get_project,
    has_prediction_version,
    iter_tasks,
    make_client,
)
from groundlabel.settings import Settings
from groundlabel.spec import parse_label_config, read_spec
from groundlabel.versions import versioned
from groundlabel_cli.main import main
from labeling_backend.prelabel import PrelabelReport, chunked, plan_tasks, run_prelabel
from workers.engines import announced_version, model_versions

# --- planning ----------------------------------------------------------------------------------------


def test_has_prediction_version_matches_whole_items():
    assert has_prediction_version({"predictions_model_versions": "a,gem-x,b"}, "gem-x")
    assert not has_prediction_version({"predictions_model_versions": "gem-x2,agem-x"}, "gem-x")
    assert not has_prediction_version({"predictions_model_versions": ""}, "gem-x")
    assert has_prediction_version({"predictions": [{"model_version": "gem-x"}]}, "gem-x")
    assert not has_prediction_version({"predictions": [{"model_version": "gem-y"}]}, "gem-x")


def test_plan_skips_current_predictions_unless_forced():
    tasks = [
        {"id": 1, "data": {"image": "a"}, "predictions_model_versions": "gem-v1"},
        {"id": 2, "data": {"image": "b"}, "predictions_model_versions": "gem-v0"},
        {"id": 3, "data": {"image": "c"}},
    ]
    plan = plan_tasks(tasks, 7, "gem-v1")
    assert [t["id"] for t in plan.todo] == [2, 3] and plan.skipped == [1] and plan.total == 3
    assert plan.todo[0] == {"id": 2, "data": {"image": "b"}}
    forced = plan_tasks(tasks, 7, "gem-v1", force=True)
    assert [t["id"] for t in forced.todo] == [1, 2, 3] and forced.skipped == []


def test_chunked():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked([], 3) == []


def test_summary_groups_failures_by_reason():
    plan = plan_tasks([{"id": i, "data": {}} for i in range(1, 6)], 3, "mv")
    report = PrelabelReport(
        plan, done=[1, 2], empty=[2], failed={3: "not found", 4: "not found", 5: "timeout"}
    )
    text = "\n".join(report.summary_lines())
    assert "done:    2 (1 with no region found)" in text
    assert "2 task(s) (3, 4): not found" in text and "1 task(s) (5): timeout" in text
    assert "failed:  3" in text


class _NoJobs:
    """A job runner that refuses every job: a run that plans nothing to predict never asks it for one."""

    where = "nowhere"

    def __getattr__(self, name):
        raise AssertionError(f"the runner was asked to {name}")

    def stats(self):
        return {}

    def close(self):
        pass


def test_prelabel_names_the_version_serve_answers_under_a_default_threshold(monkeypatch):
    """With GROUNDLABEL_DEFAULT_THRESHOLD set, prelabel reads the label config as serve does: the same model
    version, so a task that holds serve's prediction is skipped and no second prediction is made."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    import groundlabel.ls_client as ls_client
    from labeling_backend.app import create_app

    config = PROJECT_CONFIG.replace(' model_score_threshold="0.0"', "")
    settings = Settings.from_env({"GROUNDLABEL_DEFAULT_THRESHOLD": "0.05"})
    with TestClient(create_app(settings, runner=_NoJobs(), model_version="gem-x")) as client:
        served = client.post("/setup", json={"project": "7", "schema": config}).json()["model_version"]
    assert served == versioned("gem-x", read_spec(config, settings))
    assert served != versioned("gem-x", parse_label_config(config))  # the default is in the version

    task = {"id": 1, "data": {"image": "a.png"}, "predictions_model_versions": served}
    monkeypatch.setattr(ls_client, "get_project", lambda client, pid: SimpleNamespace(label_config=config))
    monkeypatch.setattr(ls_client, "iter_tasks", lambda client, pid: iter([task]))
    report = run_prelabel(
        object(), 7, settings=settings, runner=_NoJobs(), model_version="gem-x", progress=False
    )
    assert report.plan.model_version == served
    assert report.plan.skipped == [1] and report.plan.todo == [] and report.done == []


# --- CLI errors --------------------------------------------------------------------------------------


def test_cli_needs_url_and_key(monkeypatch, capsys):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert main(["prelabel", "--project", "1"]) == 2
    assert "no Label Studio URL" in capsys.readouterr().err
    assert main(["prelabel", "--project", "1", "--url", "http://127.0.0.1:9"]) == 2
    assert "no Label Studio API key" in capsys.readouterr().err
    assert main(["prelabel", "--project", "1", "--url", "localhost:8080", "--api-key", "k"]) == 2
    assert "must include the scheme" in capsys.readouterr().err
    assert main(["prelabel", "--project", "1", "--chunk-size", "0"]) == 2
    assert "--chunk-size" in capsys.readouterr().err


def test_cli_reports_an_unreachable_label_studio(monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["prelabel", "--project", "1", "--url", "http://127.0.0.1:9", "--api-key", "k"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


# --- against a real Label Studio ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_studio():
    require_label_studio()
    return shared_label_studio()


def _project(label_studio, title: str, n_images: int, *, missing: int = 0) -> tuple[int, list[int]]:
    project = label_studio.create_project(title, PROJECT_CONFIG)
    folder = f"prelabel{project}"
    label_studio.add_local_storage(project, folder)
    tasks = []
    for i in range(n_images):
        (label_studio.files_root / folder / f"img{i}.png").write_bytes(png_bytes(40 + 8 * i, 30, seed=i))
        tasks.append({"image": f"/data/local-files/?d={folder}/img{i}.png"})
    tasks += [{"image": f"/data/local-files/?d={folder}/missing{i}.png"} for i in range(missing)]
    return project, label_studio.import_tasks(project, tasks)


@pytest.fixture(scope="module")
def job_env(label_studio, tiny_gem_env):
    """The environment of the job runner's child processes: tiny GEM, Label Studio with its legacy token."""
    mp = pytest.MonkeyPatch()
    for key, value in tiny_gem_env.items():
        mp.setenv(key, value)
    mp.setenv("LABEL_STUDIO_URL", label_studio.url)
    mp.setenv("LABEL_STUDIO_API_KEY", label_studio.legacy_token)
    mp.delenv("REDIS_URL", raising=False)
    mp.delenv("GROUNDLABEL_MODEL_VERSION", raising=False)
    yield Settings.from_env()
    mp.undo()


@pytest.fixture(scope="module")
def runner(job_env):
    """One in-process job runner (a spawned child with the engines loaded) for the module's runs."""
    from workers.inprocess import InProcessRunner

    runner = InProcessRunner(job_env, warm_up=True)
    yield runner
    runner.close()


@pytest.mark.slow
@pytest.mark.integration
def test_prelabel_run_resume_and_force(label_studio, job_env, runner):
    project, ids = _project(label_studio, "prelabel run", 3, missing=1)
    client = make_client(label_studio.url, label_studio.personal_access_token())
    mv = announced_version(job_env)
    assert mv == "gem-tinyclip-random-64"  # the engine's own name (64 px input)
    versions = tuple(model_versions(job_env.engines).values())

    def prelabel(**kwargs):
        return run_prelabel(
            client, project, settings=job_env, runner=runner, model_version=mv, versions=versions, **kwargs
        )

    report = prelabel(chunk_size=2, progress=False)
    tagged = versioned(mv, parse_label_config(PROJECT_CONFIG))  # the label config's options are in it
    assert report.plan.model_version == tagged
    assert sorted(report.done) == ids[:3]
    assert list(report.failed) == [ids[3]] and "not found (HTTP 404)" in report.failed[ids[3]]
    for task_id in ids[:3]:
        (prediction,) = label_studio.predictions(task_id)
        assert prediction["model_version"] == tagged
        types = {(r["from_name"], r["type"]) for r in prediction["result"]}
        assert types <= {("poly", "polygonlabels"), ("mask", "brushlabels")} and types
        for region in prediction["result"]:
            assert set(region["value"][region["type"]]) <= {"Thing", "Other"}
    assert label_studio.predictions(ids[3]) == []

    # A re-run predicts only the task that failed (and fails it again).
    again = prelabel(chunk_size=2, progress=False)
    assert again.done == [] and sorted(again.plan.skipped) == ids[:3] and list(again.failed) == [ids[3]]
    assert all(len(label_studio.predictions(t)) == 1 for t in ids[:3])

    # --force replaces the current predictions: still one per task.
    before = {t: label_studio.predictions(t)[0]["id"] for t in ids[:3]}
    forced = prelabel(chunk_size=3, force=True, progress=False)
    assert sorted(forced.done) == ids[:3]
    for task_id in ids[:3]:
        (prediction,) = label_studio.predictions(task_id)
        assert prediction["id"] != before[task_id]

    tasks = list(iter_tasks(client, project))
    assert [has_prediction_version(t, tagged) for t in tasks] == [True, True, True, False]


@pytest.mark.slow
@pytest.mark.integration
def test_prelabel_dry_run_changes_nothing(label_studio, capsys, monkeypatch):
    project, ids = _project(label_studio, "prelabel dry run", 2)
    monkeypatch.delenv("REDIS_URL", raising=False)
    argv = [
        "prelabel",
        "--project",
        str(project),
        "--url",
        label_studio.url,
        "--dry-run",
        "--chunk-size",
        "1",
    ]
    assert main([*argv, "--api-key", label_studio.legacy_token]) == 0
    out = capsys.readouterr().out
    assert "would predict 2 task(s) in 2 chunk(s)" in out and f"task {ids[0]}:" in out
    assert "poly (PolygonLabels: Thing, Other), mask (BrushLabels: Thing)" in out
    assert all(label_studio.predictions(t) == [] for t in ids)


@pytest.mark.slow
@pytest.mark.integration
def test_label_studio_errors(label_studio):
    with pytest.raises(LabelStudioError, match="no such project"):
        get_project(make_client(label_studio.url, label_studio.legacy_token), 987654)
    with pytest.raises(LabelStudioError, match=r"refused the API key .*HTTP 401"):
        get_project(make_client(label_studio.url, "0" * 40), 1)
    with pytest.raises(UserError, match="API key"):
        make_client(label_studio.url, "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln")
