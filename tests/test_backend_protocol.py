"""The HTTP protocol against a real Redis, without a worker: validation, routing, auth, webhook, metrics."""

from __future__ import annotations

import base64
import json
import time
import zlib

import pytest
from conftest import INTERACTIVE_CONFIG, POLYGON_CONFIG, png_data_uri
from fastapi.testclient import TestClient
from rq import Queue
from rq.serializers import JSONSerializer

from groundlabel.protocol import result_key
from groundlabel.redis_queue import PENDING_PREFIX, RESULT_PREFIX
from groundlabel.settings import Settings
from labeling_backend.app import create_app

pytestmark = pytest.mark.integration


def settings_for(redis_url: str, **kw) -> Settings:
    base = dict(
        redis_url=redis_url,
        predict_timeout=0.3,
        interactive_timeout=0.3,
        model_version="test-v1",
        basic_auth_user=None,
        basic_auth_pass=None,
        api_token=None,
    )
    base.update(kw)
    return Settings.from_env({}, **base)


@pytest.fixture
def client(redis_url):
    with TestClient(create_app(settings_for(redis_url))) as c:
        yield c


def task(i: int, **data) -> dict:
    return {"id": i, "data": {"image": png_data_uri(seed=i), **data}}


def queue_len(redis_url: str, name: str) -> int:
    import redis

    conn = redis.Redis.from_url(redis_url)
    try:
        return Queue(name, connection=conn, serializer=JSONSerializer).count
    finally:
        conn.close()


def test_health_and_root_are_open(client):
    for path in ("/health", "/"):
        r = client.get(path)
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "UP" and body["model_version"] == "test-v1"
        assert body["workers"] == 0


def test_setup_answers_model_version_fast(client):
    start = time.perf_counter()
    r = client.post(
        "/setup",
        json={
            "project": "3.1700000000",
            "schema": POLYGON_CONFIG,
            "hostname": "http://localhost:8080",
            "access_token": "x" * 40,
            "extra_params": '{"a": 1}',
        },
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"model_version": "test-v1"}
    assert time.perf_counter() - start < 3.0


def test_setup_reports_unusable_config_and_bad_extra_params(client):
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"})
    assert r.status_code == 400 and "no control groundlabel can fill" in r.json()["detail"]
    r = client.post("/setup", json={"project": "1.1", "schema": POLYGON_CONFIG, "extra_params": "{oops"})
    assert r.status_code == 400 and "extra_params" in r.json()["detail"]


def test_malformed_requests_get_422_with_reason(client):
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid request" in r.json()["detail"]
    r = client.post("/predict", json={"label_config": POLYGON_CONFIG})
    assert r.status_code == 422 and "tasks" in r.json()["detail"]
    r = client.post("/predict", json={"tasks": [], "label_config": POLYGON_CONFIG})
    assert r.status_code == 422
    r = client.post("/predict", json={"tasks": [{"id": "abc", "data": {}}], "label_config": POLYGON_CONFIG})
    assert r.status_code == 422 and "id" in r.json()["detail"]
    r = client.post("/predict", json={"tasks": [{"id": 1}], "label_config": POLYGON_CONFIG})
    assert r.status_code == 422 and "data" in r.json()["detail"]
    r = client.post("/webhook", json={"project": {}})
    assert r.status_code == 422 and "action" in r.json()["detail"]


def test_validation_errors_do_not_echo_credentials(client):
    r = client.post(
        "/predict",
        json={
            "tasks": [{"id": 1, "data": {}}],
            "label_config": POLYGON_CONFIG,
            "params": {"password": "s3cret-pass", "context": "not-a-dict"},
        },
    )
    assert r.status_code == 422
    assert "s3cret-pass" not in r.text


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (
            "<View><Image name='image' value='$image'/><PolygonLabels name='p' toName='image'/></View>",
            "has no <Label> values",
        ),
        (
            "<View><Image name='image' value='$image'/><EllipseLabels name='e' toName='image'>"
            "<Label value='a'/></EllipseLabels></View>",
            "no control groundlabel can fill",
        ),
        (
            "<View><Text name='t' value='$t'/><Labels name='l' toName='t'><Label value='a'/></Labels></View>",
            "no <Image> tag",
        ),
        ("<View><Image", "cannot be parsed"),
    ],
)
def test_unusable_label_configs_get_400(client, config, reason):
    r = client.post("/predict", json={"tasks": [task(1)], "label_config": config})
    assert r.status_code == 400
    assert reason in r.json()["detail"]


def test_label_config_from_setup_is_used(client, redis_url):
    r = client.post("/predict", json={"tasks": [task(1)], "project": "7.123"})
    assert r.status_code == 400 and "no label_config" in r.json()["detail"]
    client.post("/setup", json={"project": "7.123", "schema": POLYGON_CONFIG})
    r = client.post("/predict", json={"tasks": [task(1)], "project": "7.123"})
    assert r.status_code == 200
    assert queue_len(redis_url, "batch") == 1


def test_batch_answers_one_entry_per_task_in_order(client, redis_url):
    tasks = [task(1), {"id": 2, "data": {"other": "x"}}, task(3)]
    r = client.post("/predict", json={"tasks": tasks, "label_config": POLYGON_CONFIG})
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == 3
    # No worker: nothing is done before the deadline; each task gets zero predictions ([]) so that
    # Label Studio stores nothing and asks again, and the reasons are listed per task.
    assert body["results"] == [[], [], []]
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "no 'image' image URL" in errors[2]
    assert "not finished within 0.3 s" in errors[1] and "no worker" in errors[1]
    assert body["model_version"] == "test-v1"
    assert queue_len(redis_url, "batch") == 1  # tasks 1 and 3 in one chunk; task 2 never enqueued


def test_chunks_and_pending_jobs_are_reused(redis_url):
    with TestClient(create_app(settings_for(redis_url, chunk_size=4))) as c:
        tasks = [task(i) for i in range(1, 11)]
        assert c.post("/predict", json={"tasks": tasks, "label_config": POLYGON_CONFIG}).status_code == 200
        assert queue_len(redis_url, "batch") == 3
        # The same tasks again while their jobs are queued: no new job.
        assert (
            c.post("/predict", json={"tasks": tasks[:6], "label_config": POLYGON_CONFIG}).status_code == 200
        )
        assert queue_len(redis_url, "batch") == 3
        # A different label config is a different result: new job.
        other = POLYGON_CONFIG.replace("Other", "Else")
        assert c.post("/predict", json={"tasks": tasks[:1], "label_config": other}).status_code == 200
        assert queue_len(redis_url, "batch") == 4


def test_cached_results_are_returned_without_a_job(client, redis_url):
    import redis

    body = {"tasks": [task(1)], "label_config": POLYGON_CONFIG}
    client.post("/predict", json=body)
    conn = redis.Redis.from_url(redis_url)
    pending = conn.keys(PENDING_PREFIX + "*")
    assert len(pending) == 1
    key = pending[0].decode()[len(PENDING_PREFIX) :]
    prediction = {"result": [{"id": "r"}], "score": 0.7, "model_version": "x"}
    conn.set(RESULT_PREFIX + result_key(key, "test-v1"), json.dumps(prediction))
    r = client.post("/predict", json=body)
    assert r.json()["results"] == [{"result": [{"id": "r"}], "score": 0.7, "model_version": "test-v1"}]
    assert r.json()["errors"] == []
    assert queue_len(redis_url, "batch") == 1
    conn.close()


def test_interactive_requests_use_the_interactive_queue(client, redis_url):
    context = {
        "result": [
            {
                "type": "textarea",
                "from_name": "prompt",
                "to_name": "image",
                "value": {"text": ["the red square"]},
            }
        ]
    }
    r = client.post(
        "/predict",
        json={
            "tasks": [task(5)],
            "label_config": INTERACTIVE_CONFIG,
            "params": {"login": None, "password": None, "context": context},
        },
    )
    assert r.status_code == 200
    (only,) = r.json()["results"]
    # Interactive answers are shown, not stored: one dict with the reason.
    assert only["result"] == [] and only["model_version"] == "test-v1" and "not finished" in only["error"]
    assert queue_len(redis_url, "interactive") == 1 and queue_len(redis_url, "batch") == 0
    # A context without regions is an ordinary batch request.
    r = client.post(
        "/predict",
        json={"tasks": [task(6)], "label_config": INTERACTIVE_CONFIG, "params": {"context": {"result": []}}},
    )
    assert r.json()["results"] == [[]]
    assert queue_len(redis_url, "batch") == 1


def test_job_payload_is_plain_json(client, redis_url):
    import redis

    client.post(
        "/predict", json={"tasks": [task(1)], "label_config": POLYGON_CONFIG, "hostname": "http://ls:8080"}
    )
    conn = redis.Redis.from_url(redis_url)
    (job,) = Queue("batch", connection=conn, serializer=JSONSerializer).jobs
    assert job.func_name == "workers.jobs.run_job"
    payload = job.args[0]
    assert payload["tasks"][0]["id"] == 1 and payload["spec"]["image_key"] == "image"
    assert payload["model_version"] == "test-v1" and payload["label_studio_url"] == "http://ls:8080"
    raw = conn.hget(job.key, "data")
    json.loads(zlib.decompress(raw))  # the stored job data is (compressed) JSON, not pickle
    conn.close()


def test_webhook_events(client):
    r = client.post(
        "/webhook",
        json={
            "action": "ANNOTATION_CREATED",
            "project": {"id": 4},
            "annotation": {"result": [{"type": "textarea", "value": {"text": ["left dog"]}}]},
        },
    )
    assert r.status_code == 201
    assert r.json()["status"] == "ok" and r.json()["result"]["latest_prompt"] == "left dog"
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
    assert r.status_code == 400 and "training" in r.json()["detail"].lower()  # no model store configured
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 4}})
    assert r.status_code == 200 and r.json()["status"] == "Unknown event"


def test_metrics_exposition(client):
    client.post("/predict", json={"tasks": [task(1)], "label_config": POLYGON_CONFIG})
    text = client.get("/metrics").text
    assert 'groundlabel_queue_jobs{queue="batch",state="queued"} 1.0' in text
    assert 'groundlabel_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert "groundlabel_request_seconds_bucket" in text
    assert 'groundlabel_task_failures_total{reason="timeout"} 1.0' in text
    assert "groundlabel_queue_up 1.0" in text


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_and_bearer_token(redis_url):
    s = settings_for(redis_url, basic_auth_user="ls", basic_auth_pass="pw-123", api_token="tok-abcdef")
    body = {"tasks": [task(1)], "label_config": POLYGON_CONFIG}
    with TestClient(create_app(s)) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/predict", json=body)
        assert r.status_code == 401 and "credentials required" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Basic")
        r = c.post("/predict", json=body, headers=_basic("ls", "wrong"))
        assert r.status_code == 401 and "wrong user name or password" in r.json()["detail"]
        assert c.post("/predict", json=body, headers=_basic("other", "pw-123")).status_code == 401
        assert c.post("/predict", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/predict", json=body, headers={"Authorization": "Basic !!!"}).status_code == 401
        assert c.post("/predict", json=body, headers=_basic("ls", "pw-123")).status_code == 200
        assert (
            c.post("/predict", json=body, headers={"Authorization": "Bearer tok-abcdef"}).status_code == 200
        )
        assert c.post("/setup", json={"project": "1.1"}).status_code == 401
        assert c.post("/webhook", json={"action": "START_TRAINING"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=_basic("ls", "pw-123")).status_code == 200
    with TestClient(create_app(s.with_(metrics_public=True))) as c:
        assert c.get("/metrics").status_code == 200


def test_too_many_tasks_is_refused(redis_url):
    with TestClient(create_app(settings_for(redis_url, max_tasks=2))) as c:
        r = c.post("/predict", json={"tasks": [task(i) for i in range(3)], "label_config": POLYGON_CONFIG})
        assert r.status_code == 400 and "GROUNDLABEL_MAX_TASKS" in r.json()["detail"]
