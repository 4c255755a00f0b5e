"""Background runs: a *Retrieve Predictions* past the backend's deadline ends with every task predicted once.

The store and the claims are tested on a real Redis server and on the in-process store alike. The proofs
run a real Label Studio, ``groundlabel serve`` (on Redis with real ``groundlabel worker`` processes, or
with its in-process runner) on the tiny random CLIP, and click *Retrieve Predictions* through Label
Studio's own Data Manager action: the click answers at the backend's (short) deadline, and the rest is
written into Label Studio in the background, once per task, through a second click, a killed worker and
a restarted backend.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import REPO, clean_env, png_bytes, serve_process

from labeling_backend.background import KEEP_RUNS, LocalStore, RunStore, TaskOwners

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image" model_score_threshold="0.0">'
    '<Label value="Thing"/></BrushLabels></View>'
)


@pytest.fixture(params=["redis", "local"])
def kv(request):
    """The runs' store: a real Redis server (flushed) or the in-process store."""
    if request.param == "local":
        return LocalStore()
    server = request.getfixturevalue("redis_server")
    client = server.client()
    client.flushdb()
    return client


def test_a_task_has_one_owner_at_a_time(kv):
    owners = TaskOwners(kv)
    assert owners.claim("7", [1, 2, 3], "run-a") == [1, 2, 3]
    assert owners.claim("7", [2, 3, 4], "prelabel-b") == [4]
    assert owners.claim("8", [2], "prelabel-b") == [2]  # another project's task 2
    assert owners.claim("7", [1, 2], "run-a") == [1, 2]  # held already
    assert owners.owners("7", [1, 2, 4, 5]) == {1: "run-a", 2: "run-a", 4: "prelabel-b"}
    owners.release("7", [1, 4], "run-a")  # task 4 is not run-a's: it stays
    assert owners.owners("7", [1, 4]) == {4: "prelabel-b"}
    assert owners.claim("7", [1], "prelabel-b") == [1]


def test_a_run_records_progress_and_one_backend_drives_it(kv):
    store = RunStore(kv)
    tasks = [{"id": i, "data": {"image": f"/x/{i}.png"}, "key": f"k{i}"} for i in (5, 6, 7, 8)]
    store.create("r1", {"project": "3", "spec": {}}, tasks)
    assert store.active() == ["r1"]
    assert store.left("r1") == [5, 6, 7, 8]
    assert store.tasks("r1", [6, 9]) == {6: tasks[1]}
    store.begin_write("r1", [5, 6])
    assert store.writing("r1") == [5, 6]
    store.end_write("r1", [5, 6])
    store.end_write("r1", [5])  # written once is counted once
    store.fail("r1", {7: "unreadable image"})
    store.set_jobs("r1", {8: ("job1", 0, 2)})
    assert store.jobs("r1", [7, 8]) == {8: ("job1", 0, 2)}
    info = store.info("r1")
    assert (info.total, info.written, info.failed, info.left) == (4, 2, 1, 1)
    assert info.failures == {"7": "unreadable image"}
    assert store.writing("r1") == []

    assert store.lease("r1", "backend-a")
    assert store.lease("r1", "backend-a")  # renewed
    assert not store.lease("r1", "backend-b")
    store.unlease("r1", "backend-b")  # not its lease: nothing changes
    assert not store.lease("r1", "backend-b")
    store.unlease("r1", "backend-a")
    assert store.lease("r1", "backend-b")

    store.end_write("r1", [8])
    store.set_status("r1", "done")
    assert store.active() == []
    assert store.info("r1").status == "done"


def test_old_runs_are_forgotten_beyond_the_kept_number(kv):
    store = RunStore(kv)
    for n in range(KEEP_RUNS + 3):
        store.create(f"r{n}", {"project": "1"}, [{"id": 1, "data": {}, "key": "k"}])
        kv.hset(store.key(f"r{n}"), mapping={"created": 1000 + n})
        store.set_status(f"r{n}", "done")
    store.create("live", {"project": "1"}, [{"id": 2, "data": {}, "key": "k2"}])
    recent = store.recent(5)
    assert [r.id for r in recent] == [
        "live",
        f"r{KEEP_RUNS + 2}",
        f"r{KEEP_RUNS + 1}",
        f"r{KEEP_RUNS}",
        f"r{KEEP_RUNS - 1}",
    ]
    store.recent(KEEP_RUNS + 10)
    assert store.info("r0") is None and store.info("r2") is None  # the oldest ended runs are gone
    assert store.info("live") is not None


# -- the proof against a real Label Studio -----------------------------------------------------------


def _project(label_studio, title: str, n: int) -> tuple[int, list[int]]:
    project = label_studio.create_project(title, CONFIG)
    folder = f"bg{project}"
    label_studio.add_local_storage(project, folder)
    for i in range(n):
        Path(label_studio.files_root, folder, f"img{i}.png").write_bytes(png_bytes(40, 32, seed=i))
    ids = label_studio.import_tasks(
        project, [{"image": f"/data/local-files/?d={folder}/img{i}.png"} for i in range(n)]
    )
    assert len(ids) == n
    return project, ids


def _predictions(label_studio, project: int) -> Counter:
    """Predictions per task id of the project."""
    counts: Counter = Counter()
    for p in label_studio.api_json("GET", "/api/predictions", params={"project": project}):
        counts[p["task"]] += 1
    return counts


def _connect(label_studio, backend: str, project: int) -> None:
    ml = label_studio.api_json(
        "POST", "/api/ml", json={"url": backend, "project": project, "title": "groundlabel"}
    )
    assert ml["id"] and ml.get("state") != "ER", ml


def _wait_count(label_studio, project: int, n: int, timeout: float) -> Counter:
    """The predictions per task once at least ``n`` tasks have one (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = _predictions(label_studio, project)
        if len(counts) >= n or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def _wait_run(backend: str, project: str, timeout: float) -> dict:
    """The backend's first background run of ``project`` as soon as it exists."""
    deadline = time.monotonic() + timeout
    while True:
        runs = httpx.get(backend + "/background", timeout=5).json()["runs"]
        run = next((r for r in runs if r["project"] == project), None)
        if run is not None:
            return run
        assert time.monotonic() < deadline, f"no background run of project {project} after {timeout} s"
        time.sleep(0.05)


def _env(label_studio, tiny_gem_env, **extra: str) -> dict[str, str]:
    return clean_env(
        {
            **tiny_gem_env,
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.personal_access_token(),
            "GROUNDLABEL_PREDICT_TIMEOUT": "2",
            **extra,
        }
    )


@pytest.mark.slow
@pytest.mark.integration
def test_retrieve_predictions_on_redis_ends_with_every_task_once(
    label_studio_session, tiny_gem_env, redis_url, start_worker, tmp_path
):
    """300 tasks, one click: 300 predictions, none twice, through a second click, a worker killed
    mid-way (a new one started later) and a backend restarted mid-way."""
    ls = label_studio_session
    project, ids = _project(ls, "background on redis", 300)
    env = _env(ls, tiny_gem_env, REDIS_URL=redis_url, GROUNDLABEL_BACKGROUND_JOBS="1")
    worker = start_worker(redis_url, env)
    worker.wait_ready(redis_url)
    with serve_process(env, tmp_path / "serve1.log") as backend:
        _connect(ls, backend, project)
        seconds = ls.retrieve_predictions(project, timeout=200)
        after_click = len(_predictions(ls, project))
        assert after_click < 300, "every task was answered within the deadline: nothing was left over"
        health = httpx.get(backend + "/health", timeout=5).json()
        running = health["background"]["running"]
        assert len(running) == 1 and running[0]["project"] == str(project), health
        run_id = running[0]["id"]
        # A second click while the run goes on: the run's tasks are left to it.
        ls.retrieve_predictions(project, timeout=200)
        # Kill the worker once some of the run is written.
        _wait_count(ls, project, after_click + 20, 120)
        worker.kill()
    # The backend stopped too (mid-run); a new backend and a new worker resume the run.
    counts_stopped = _predictions(ls, project)
    with serve_process(env, tmp_path / "serve2.log") as backend:
        start_worker(redis_url, env).wait_ready(redis_url)
        counts = _wait_count(ls, project, len(ids), 240)
        assert set(counts) == set(ids), f"{len(counts)} of 300 predicted"
        assert max(counts.values()) == 1, [t for t, c in counts.items() if c > 1]
        runs = httpx.get(backend + "/background", timeout=5).json()["runs"]
        run = next(r for r in runs if r["id"] == run_id)
        for _ in range(20):  # the last write is recorded just after Label Studio has it
            if run["status"] == "done":
                break
            time.sleep(0.5)
            run = next(
                r for r in httpx.get(backend + "/background", timeout=5).json()["runs"] if r["id"] == run_id
            )
        assert run["status"] == "done" and run["left"] == 0 and run["failed"] == 0, run
        # Every task the click did not answer directly was the run's, and the run wrote each one (it
        # may have written some before the click's answer was stored, so ``after_click`` can hold them).
        assert run["written"] == run["total"], run
        assert 300 - run["total"] <= after_click, (run, after_click)
        metrics = httpx.get(backend + "/metrics", timeout=5).text
        assert (
            f'groundlabel_background_tasks{{project="{project}",state="written"}} {run["written"]}.0'
            in metrics
        )
    assert after_click + 20 <= len(counts_stopped) < 300  # the backend and the worker stopped mid-run
    assert seconds < 30  # the click answered at the backend's deadline, not after the whole project
    versions = {
        p["model_version"] for p in ls.api_json("GET", "/api/predictions", params={"project": project})
    }
    assert len(versions) == 1, versions  # the background wrote the version a direct answer carries


@pytest.mark.slow
@pytest.mark.integration
def test_in_process_background_run_and_cancel(label_studio_session, tiny_gem_env, tmp_path):
    """Without Redis: a click's late tasks are written once; a second project's run is cancelled from the
    command line and writes nothing more."""
    ls = label_studio_session
    # A deadline short enough that a fast CPU cannot answer every task inside it (2 s did, 120 tasks).
    env = _env(ls, tiny_gem_env, GROUNDLABEL_PREDICT_TIMEOUT="0.5")
    project, ids = _project(ls, "background in process", 120)
    with serve_process(env, tmp_path / "serve.log") as backend:
        _connect(ls, backend, project)
        ls.retrieve_predictions(project, timeout=200)
        runs = httpx.get(backend + "/background", timeout=5).json()["runs"]
        assert [r["project"] for r in runs] == [str(project)], runs  # the late tasks became a run
        counts = _wait_count(ls, project, len(ids), 180)
        assert set(counts) == set(ids) and max(counts.values()) == 1, counts

        other, other_ids = _project(ls, "background cancelled", 200)
        _connect(ls, backend, other)
        # Cancelled as soon as the run exists (the click still in flight), before it can have finished.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            click = pool.submit(ls.retrieve_predictions, other, timeout=200)
            run = _wait_run(backend, str(other), 120)
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "groundlabel",
                    "background",
                    "--backend",
                    backend,
                    "cancel",
                    run["id"],
                ],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            click.result(timeout=200)
        assert cli.returncode == 0, cli.stderr
        assert "cancelled" in cli.stdout
        time.sleep(3)
        stopped = len(_predictions(ls, other))
        time.sleep(4)
        assert len(_predictions(ls, other)) == stopped < 200
        listing = subprocess.run(
            [sys.executable, "-m", "groundlabel", "background", "--backend", backend],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run["id"] in listing.stdout and "cancelled" in listing.stdout, listing.stdout


# -- the backend's routes, on a real Redis without a worker (nothing is written) ---------------------


def _predict(client, ids: list[int], project: str = "5") -> dict:
    body = {
        "tasks": [{"id": i, "data": {"image": f"http://127.0.0.1:9/{i}.png"}} for i in ids],
        "label_config": CONFIG,
        "project": f"{project}.1712345678",
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _backend(redis_url: str, **settings):
    from fastapi.testclient import TestClient

    from groundlabel.settings import Settings
    from labeling_backend.app import create_app

    values = {"redis_url": redis_url, "predict_timeout": 0.5, **settings}
    return TestClient(create_app(Settings.from_env({}, **values), model_version="gem-test"))


def test_without_label_studio_access_late_tasks_are_left_as_today(redis_server, redis_url, caplog):
    redis_server.client().flushdb()
    with _backend(redis_url) as client, caplog.at_level("INFO", logger="groundlabel.backend"):
        health = client.get("/health").json()
        assert health["background"]["enabled"] is False
        assert "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in health["background"]["reason"]
        answer = _predict(client, [1, 2])
        assert answer["results"] == [[], []]
        assert all("not finished within 0.5 s" in e["error"] for e in answer["errors"])
        assert client.get("/background").json()["runs"] == []
    assert "not finished in time: background predictions need LABEL_STUDIO_URL" in caplog.text
    # The jobs keep the request's deadline: no image is fetched after it.
    from rq import Queue
    from rq.serializers import JSONSerializer

    queued = Queue("batch", connection=redis_server.client(), serializer=JSONSerializer).jobs
    assert queued and all(job.args[0]["deadline"] is not None for job in queued)


def test_late_tasks_become_a_run_that_later_requests_leave_alone_until_cancelled(redis_server, redis_url):
    redis_server.client().flushdb()
    access = {"label_studio_url": "http://127.0.0.1:9", "api_key": "not-used"}
    with _backend(redis_url, **access) as client:
        first = _predict(client, [1, 2, 3])
        assert first["results"] == [[], [], []]
        runs = client.get("/background").json()["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert (run["project"], run["status"], run["total"], run["left"]) == ("5", "running", 3, 3)
        assert all(f"background run {run['id']}" in e["error"] for e in first["errors"])
        assert client.get("/health").json()["background"]["running"][0]["id"] == run["id"]
        metrics = client.get("/metrics").text
        assert 'groundlabel_background_tasks{project="5",state="left"} 3.0' in metrics

        # A second click for the same tasks and one more: the run's tasks are left to it.
        second = _predict(client, [2, 3, 4])
        errors = {e["task"]: e["error"] for e in second["errors"]}
        assert errors[2].startswith(f"being predicted by background run {run['id']}")
        assert errors[3].startswith(f"being predicted by background run {run['id']}")
        assert "being predicted" not in errors[4]  # a new run takes task 4 only
        runs = client.get("/background").json()["runs"]
        assert sorted(r["total"] for r in runs) == [1, 3]
        # Another project's task 2 is another task.
        assert "being predicted" not in _predict(client, [2], project="6")["errors"][0]["error"]

        cancelled = client.post(f"/background/{run['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert client.post("/background/nosuchrun/cancel").status_code == 404
        third = _predict(client, [1])
        assert "being predicted" not in third["errors"][0]["error"]  # released by the cancel
