"""Jobs round-trip through a real ``groundlabel worker`` process (tiny random-weight GEM) and real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib

import pytest
import redis
from conftest import (
    INTERACTIVE_CONFIG,
    POLYGON_CONFIG,
    WorkerProcess,
    free_port,
    png_data_uri,
    png_header_only,
)
from fastapi.testclient import TestClient
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from groundlabel.protocol import JobPayload, result_key
from groundlabel.redis_queue import COMPRESS_MAX_BYTES, RESULT_PREFIX, make_queues
from groundlabel.settings import Settings
from groundlabel.spec import parse_label_config, spec_tag
from labeling_backend.app import create_app
from labeling_backend.queue import RedisJobQueue

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLOSED_PORT = free_port()


@pytest.fixture(scope="module")
def worker(redis_server, tiny_gem_env, tmp_path_factory):
    redis_server.client().flushall()
    env = {**tiny_gem_env, "GROUNDLABEL_ALLOWED_HOSTS": f"127.0.0.1:{CLOSED_PORT}"}
    proc = WorkerProcess(redis_server.url, env, log_path=tmp_path_factory.mktemp("w") / "worker.log")
    try:
        proc.wait_ready(redis_server.url, timeout=120)
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def client(redis_server, worker):
    settings = Settings.from_env(
        {},
        redis_url=redis_server.url,
        predict_timeout=60,
        interactive_timeout=60,
        model_version="test-worker",
    )
    with TestClient(create_app(settings)) as c:
        yield c


def finished_jobs(url: str) -> int:
    conn = redis.Redis.from_url(url)
    try:
        return sum(
            FinishedJobRegistry(q, connection=conn).get_job_count(cleanup=False)
            for q in ("interactive", "batch")
        )
    finally:
        conn.close()


def test_round_trip_then_cache(client, redis_server):
    tasks = [{"id": 100 + i, "data": {"image": png_data_uri(48 + 8 * i, 32, seed=100 + i)}} for i in range(3)]
    before = finished_jobs(redis_server.url)
    r = client.post("/predict", json={"tasks": tasks, "label_config": POLYGON_CONFIG})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["errors"] == []
    assert len(body["results"]) == 3
    for t, prediction in zip(tasks, body["results"], strict=True):
        assert prediction["model_version"] == "test-worker"
        assert 0.0 <= prediction["score"] <= 1.0
        regions = prediction["result"]
        assert regions, "threshold 0 puts every pixel in some label"
        width = int(t["data"]["image"] and 48 + 8 * (t["id"] - 100))
        for region in regions:
            assert region["type"] == "polygonlabels" and region["from_name"] == "poly"
            assert region["original_width"] == width and region["original_height"] == 32
            assert region["value"]["polygonlabels"][0] in ("Thing", "Other")
    assert finished_jobs(redis_server.url) == before + 1  # three tasks, one job (one GEM batch)

    again = client.post("/predict", json={"tasks": tasks[::-1], "label_config": POLYGON_CONFIG}).json()
    assert again["results"] == body["results"][::-1]
    assert finished_jobs(redis_server.url) == before + 1  # answered from the result cache


def test_bad_tasks_fail_alone(client):
    huge = "data:image/png;base64," + base64.b64encode(png_header_only(30000, 30000)).decode()
    tasks = [
        {"id": 201, "data": {"image": png_data_uri(seed=201)}},
        {"id": 202, "data": {"picture": png_data_uri(seed=202)}},
        {"id": 203, "data": {"image": "http://example.com/cat.png"}},
        {"id": 204, "data": {"image": f"http://127.0.0.1:{CLOSED_PORT}/cat.png"}},
        {"id": 205, "data": {"image": huge}},
        {"id": 206, "data": {"image": "data:text/plain;base64," + base64.b64encode(b"hello").decode()}},
        {"id": 207, "data": {"image": png_data_uri(seed=207)}},
    ]
    r = client.post("/predict", json={"tasks": tasks, "label_config": POLYGON_CONFIG})
    assert r.status_code == 200
    body = r.json()
    results, errors = body["results"], {e["task"]: e["error"] for e in body["errors"]}
    assert len(results) == 7
    assert results[0]["result"] and results[6]["result"]
    assert all(results[i] == [] for i in range(1, 6))
    assert set(errors) == {202, 203, 204, 205, 206}
    assert "no 'image' image URL" in errors[202]
    assert "GROUNDLABEL_ALLOWED_HOSTS" in errors[203] or "not allowed" in errors[203]
    assert "127.0.0.1" in errors[204]
    assert "900000000 pixels" in errors[205] or "30000" in errors[205]
    assert "cannot fetch image" in errors[206]


def test_interactive_text_prompt_without_lavt_uses_gem(client):
    context = {
        "result": [
            {
                "type": "textarea",
                "from_name": "prompt",
                "to_name": "image",
                "value": {"text": ["the red thing"]},
            }
        ]
    }
    r = client.post(
        "/predict",
        json={
            "tasks": [{"id": 301, "data": {"image": png_data_uri(seed=301)}}],
            "label_config": INTERACTIVE_CONFIG,
            "params": {"context": context},
        },
    )
    assert r.status_code == 200
    (prediction,) = r.json()["results"]
    assert "error" not in prediction
    types = {region["type"] for region in prediction["result"]}
    assert "brushlabels" in types
    for region in prediction["result"]:
        if region["type"] == "brushlabels":
            assert region["value"]["brushlabels"] == ["Thing"] and region["value"]["format"] == "rle"


def test_interactive_click_selects_the_clicked_part(client):
    context = {
        "result": [
            {
                "type": "keypointlabels",
                "from_name": "click",
                "to_name": "image",
                "original_width": 40,
                "original_height": 30,
                "is_positive": True,
                "value": {"x": 50.0, "y": 50.0, "width": 1.0, "keypointlabels": ["Thing"]},
            }
        ]
    }
    r = client.post(
        "/predict",
        json={
            "tasks": [{"id": 302, "data": {"image": png_data_uri(seed=302)}}],
            "label_config": INTERACTIVE_CONFIG,
            "params": {"context": context},
        },
    )
    (prediction,) = r.json()["results"]
    assert "error" not in prediction, prediction
    types = [region["type"] for region in prediction["result"]]
    assert types and set(types) == {"brushlabels"}  # the clicked KeyPointLabels control gets nothing back


def test_unknown_clicked_label_is_a_task_error(client):
    context = {
        "result": [
            {
                "type": "keypointlabels",
                "from_name": "click",
                "to_name": "image",
                "value": {"x": 5.0, "y": 5.0, "keypointlabels": ["Nope"]},
            }
        ]
    }
    r = client.post(
        "/predict",
        json={
            "tasks": [{"id": 303, "data": {"image": png_data_uri(seed=303)}}],
            "label_config": INTERACTIVE_CONFIG,
            "params": {"context": context},
        },
    )
    (prediction,) = r.json()["results"]
    assert prediction["result"] == [] and "'Nope'" in prediction["error"]


def _job_for_task(conn: redis.Redis, task_id: int) -> Job:
    ids = [k.decode()[len("rq:job:") :] for k in conn.keys("rq:job:*") if b":" not in k[len("rq:job:") :]]
    for job in Job.fetch_many(ids, connection=conn, serializer=JSONSerializer):
        if job is not None and [t["id"] for t in job.args[0]["tasks"]] == [task_id]:
            return job
    raise AssertionError(f"no job for task {task_id}")


def test_finished_job_keeps_no_inline_image_and_caches_under_the_worker_version(redis_server, worker):
    """The stored payload drops its data URI once the job is done; the result cache and the prediction
    carry the version the worker ran, not the one the backend announced."""
    settings = Settings.from_env({}, redis_url=redis_server.url, predict_timeout=60, model_version=None)
    image = png_data_uri(160, 120, seed=401)
    body = {"tasks": [{"id": 401, "data": {"image": image}}], "label_config": POLYGON_CONFIG}
    with TestClient(create_app(settings, model_version="gem-announced")) as c:
        r = c.post("/predict", json=body)
    assert r.status_code == 200 and r.json()["errors"] == [], r.text
    (prediction,) = r.json()["results"]
    spec = parse_label_config(POLYGON_CONFIG)
    assert prediction["model_version"].startswith("gem-tinyclip")
    assert prediction["model_version"].endswith("-cfg" + spec_tag(spec))
    conn = redis.Redis.from_url(redis_server.url)
    try:
        job = _job_for_task(conn, 401)
        stored = zlib.decompress(conn.hget(job.key, "data")).decode()
        assert len(image) > 5000 and len(stored) < 3000, len(stored)
        assert image not in stored and "dropped after the job" in stored
        engine_version = prediction["model_version"].rsplit("-cfg", 1)[0]
        keys = [k.decode() for k in conn.keys(RESULT_PREFIX + "*")]
        (key,) = [k for k in keys if k.endswith("@" + engine_version)]
        assert json.loads(conn.get(key))["result"] == prediction["result"]
    finally:
        conn.close()


def test_worker_honours_the_job_deadline(redis_server, worker):
    """A job whose deadline has passed fetches nothing: its tasks fail alone, quickly, and nothing is
    cached or retried."""
    settings = Settings.from_env({}, redis_url=redis_server.url)
    queue = RedisJobQueue(settings.queue)
    spec = parse_label_config(POLYGON_CONFIG)
    tasks = [{"id": 500 + i, "data": {"image": png_data_uri(seed=500 + i)}} for i in range(3)]
    payload = JobPayload(tasks, spec, deadline=time.time() - 1)
    job_id, taken = queue.submit(payload, [f"deadline-{i}" for i in range(3)], interactive=False)
    assert taken == [0, 1, 2]
    deadline = time.monotonic() + 60
    state = queue.poll([job_id])[job_id]
    while state.status == "pending" and time.monotonic() < deadline:
        asyncio.run(queue.wait([job_id], 1.0))
        state = queue.poll([job_id])[job_id]
    assert state.status == "finished", state
    errors = [p.get("error") or "" for p in state.results or []]
    assert len(errors) == 3 and all("deadline passed" in e for e in errors), errors
    assert queue.cache_get([result_key(f"deadline-{i}", "") for i in range(3)]) == [None] * 3
    assert queue.pending_get([f"deadline-{i}" for i in range(3)]) == [None] * 3
    queue.close()


def test_a_large_payload_is_stored_undeflated_and_read_back_by_rq(redis_server):
    """Deflating base64 images costs milliseconds and saves little: a payload over COMPRESS_MAX_BYTES is
    stored as a stored-only zlib stream, a small one is deflated; RQ reads both back."""
    conn = redis.Redis.from_url(redis_server.url)
    queue = make_queues(conn, Settings.from_env({}).queue)["batch"]
    try:
        for size, deflated in ((2_000, True), (COMPRESS_MAX_BYTES + 1_000, False)):
            text = "A" * size
            job = queue.create_job("workers.jobs.run_job", args=({"tasks": [], "blob": text},))
            job.save()
            raw = conn.hget(job.key, "data")
            assert (len(raw) < size // 10) is deflated, len(raw)
            back = Job.fetch(job.id, connection=conn, serializer=JSONSerializer)
            assert back.args[0]["blob"] == text
            job.delete()
    finally:
        conn.close()
