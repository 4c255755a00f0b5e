"""The backend's training endpoints against a real redis-server: Start Training (webhook and /train), one
job per project, the every-N-annotations trigger, /job_status, /versions, /setup per project, /metrics;
a real training worker whose job fails keeps the promoted version and says why; the store and its CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from groundlabel.model_store import ModelStore
from groundlabel.settings import Settings
from groundlabel.training_queue import LOCK_PREFIX, read_status, remember_project
from groundlabel_cli.main import main
from labeling_backend.app import create_app

BASE = "gem-test-base"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="expr" toName="image" value="$text"/>
  <PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels>
</View>"""


def settings_for(redis_url: str, store, **kw) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, model_store=str(store), **kw)


def add_version(store: ModelStore, project: str, tmp_path, oiou: float = 0.5):
    weights = safetensors_file(tmp_path / f"w{time.monotonic_ns()}.safetensors")
    return store.add(
        project=project,
        kind="lavt",
        variant="tiny",
        weights=weights,
        parent="lavt-tiny-base",
        annotation_count=12,
        metrics={"base": {"oIoU": 0.1}, "new": {"oIoU": oiou}},
    )


def safetensors_file(path):
    """A small safetensors file (a version's weights need not fit a model to be listed or promoted)."""
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, np.float32)}, str(path))
    return path


def webhook(client, action: str, project: int, **extra):
    return client.post("/webhook", json={"action": action, "project": {"id": project}, **extra})


@pytest.mark.integration
def test_start_training_enqueues_one_job_per_project_and_reports_it(redis_url, tmp_path):
    store = tmp_path / "store"
    with TestClient(create_app(settings_for(redis_url, store), model_version=BASE)) as client:
        first = webhook(client, "START_TRAINING", 5)
        assert first.status_code == 201, first.text
        job = first.json()["job"]
        assert first.json()["result"]["training"] == {"job": job, "created": True, "project": "5"}
        again = webhook(client, "START_TRAINING", 5)
        assert again.json()["job"] == job and again.json()["result"]["training"]["created"] is False
        legacy = client.post(
            "/train", json={"project": "5.1700000000", "annotations": [], "label_config": CONFIG}
        )
        assert legacy.status_code == 201 and legacy.json()["job"] == job
        other = webhook(client, "START_TRAINING", 6).json()["job"]
        assert other != job

        status = client.post("/job_status", json={"job": job})
        assert status.status_code == 200 and status.json()["job_status"] == "queued"
        assert status.json()["project"] == "5" and status.json()["trigger"] == "START_TRAINING"
        assert client.post("/job_status", json={"job": "nope"}).status_code == 410

        # Series only for projects known to exist: read from Label Studio by a training job (or holding
        # versions in the store); asking to train a project does not make one.
        text = client.get("/metrics").text
        assert 'project="5"' not in text and 'project="6"' not in text
        remember_project(client.app.state.backend.training.connection, "5")
        text = client.get("/metrics").text
        assert 'groundlabel_training_running{project="5"} 1.0' in text and 'project="6"' not in text


@pytest.mark.integration
def test_every_n_annotations_starts_a_training(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path / "store", every=3)
    with TestClient(create_app(settings, model_version=BASE)) as client:
        annotation = {"result": [{"type": "textarea", "value": {"text": ["the red circle"]}}]}
        answers = [webhook(client, "ANNOTATION_CREATED", 9, annotation=annotation).json() for _ in range(2)]
        assert all("job" not in a for a in answers)
        assert answers[0]["result"]["latest_prompt"] == "the red circle"
        third = webhook(client, "ANNOTATION_UPDATED", 9, annotation=annotation).json()
        assert third["job"] and third["result"]["training"]["created"]
        assert read_status(client.app.state.backend.training.connection, "9")["trigger"] == "3 annotations"


@pytest.mark.integration
def test_without_a_store_start_training_says_why(redis_url):
    settings = Settings.from_env({}, redis_url=redis_url)
    with TestClient(create_app(settings, model_version=BASE)) as client:
        answer = webhook(client, "START_TRAINING", 5)
        assert answer.status_code == 400 and "GROUNDLABEL_MODEL_STORE" in answer.json()["detail"]
        assert client.get("/versions").json() == {"versions": [BASE], "details": []}


@pytest.mark.integration
def test_setup_and_versions_follow_the_promoted_version(redis_url, tmp_path):
    store = ModelStore(tmp_path / "store")
    with TestClient(create_app(settings_for(redis_url, store.root), model_version=BASE)) as client:
        setup = {"project": "5.1700000000", "schema": CONFIG, "hostname": "http://ls"}
        assert client.post("/setup", json=setup).json()["model_version"].startswith(BASE + "-cfg")
        v1 = add_version(store, "5", tmp_path)
        assert client.post("/setup", json=setup).json()["model_version"].startswith(BASE)  # not promoted
        store.promote("5", v1.name, "test")
        announced = client.post("/setup", json=setup).json()["model_version"]
        assert announced.startswith("lavt-tiny-p5-v1-cfg"), announced
        other = {**setup, "project": "6.1700000000"}
        assert client.post("/setup", json=other).json()["model_version"].startswith(BASE)
        versions = client.get("/versions", params={"project": "5"}).json()
        assert versions["versions"] == [BASE, "lavt-tiny-p5-v1"]
        assert versions["details"][0]["promoted"] and versions["details"][0]["heldout_oIoU"] == 0.5
        store.rollback("5")
        assert client.post("/setup", json=setup).json()["model_version"].startswith(BASE)


@pytest.mark.integration
def test_a_failing_training_job_keeps_the_promoted_version_and_says_why(redis_url, tmp_path, start_worker):
    store = ModelStore(tmp_path / "store")
    store.promote("5", add_version(store, "5", tmp_path).name, "test")
    env = {"GROUNDLABEL_MODEL_STORE": str(store.root), "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}
    worker = start_worker(redis_url, env, extra_args=["--queues", "train"])
    worker.wait_ready(redis_url)
    with TestClient(create_app(settings_for(redis_url, store.root), model_version=BASE)) as client:
        job = webhook(client, "START_TRAINING", 5).json()["job"]
        deadline = time.monotonic() + 60
        while (status := client.post("/job_status", json={"job": job}).json())["job_status"] != "failed":
            assert time.monotonic() < deadline, (status, worker.output())
            time.sleep(0.2)
        assert "LABEL_STUDIO_URL" in status["reason"], status
        assert store.promoted_name("5") == "lavt-tiny-p5-v1"
        connection = client.app.state.backend.training.connection
        assert connection.get(LOCK_PREFIX + "5") is None  # released: the next press starts a new job
        assert 'groundlabel_training_failed{project="5"} 1.0' in client.get("/metrics").text
        assert webhook(client, "START_TRAINING", 5).json()["job"] != job


def test_models_cli_lists_promotes_and_rolls_back(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    v1 = add_version(store, "4", tmp_path, oiou=0.42)
    root = ["models", "--store", str(store.root)]
    assert main([*root, "promote", "--project", "4", v1.name]) == 0
    assert store.promoted_name("4") == v1.name
    capsys.readouterr()
    assert main([*root, "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == v1.name and row["promoted"] and row["heldout_oIoU"] == 0.42
    assert main([*root, "list", "--project", "4"]) == 0
    assert f"*{v1.name}" in capsys.readouterr().out
    assert main([*root, "rollback", "--project", "4"]) == 0 and store.promoted_name("4") is None
    assert main([*root, "promote", "--project", "4", "lavt-tiny-p4-v7"]) == 2
    assert "no version" in capsys.readouterr().err


@pytest.mark.integration
def test_a_training_worker_killed_mid_job_frees_the_project(redis_url, tmp_path, start_worker):
    """Label Studio never answers, the training worker is killed mid-job: once its lease runs out the job
    is failed with the reason, and the next Start Training queues a new job."""
    import signal
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: held.extend(iter(lambda: listener.accept()[0], None)), daemon=True
    ).start()
    store = tmp_path / "store"
    env = {
        "GROUNDLABEL_MODEL_STORE": str(store),
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "LABEL_STUDIO_API_KEY": "0" * 40,
    }
    worker = start_worker(redis_url, env, extra_args=["--queues", "train"])
    worker.wait_ready(redis_url)
    try:
        with TestClient(create_app(settings_for(redis_url, store), model_version=BASE)) as client:
            job = webhook(client, "START_TRAINING", 5).json()["job"]
            deadline = time.monotonic() + 60
            while client.post("/job_status", json={"job": job}).json()["job_status"] != "started":
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.1)
            worker.kill(signal.SIGKILL)
            while (status := client.post("/job_status", json={"job": job}).json())["job_status"] != "failed":
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert "stopped" in status["reason"], status
            again = webhook(client, "START_TRAINING", 5).json()
            assert again["job"] != job and again["result"]["training"]["created"]
    finally:
        listener.close()
        for conn in held:
            conn.close()
