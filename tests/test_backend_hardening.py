"""The hostile-probe faults of the backend, against a real uvicorn server and a real Redis (no worker).

- the door: credentials and the body cap are checked from the headers, before a body is read;
- ``/health`` answers while many ``/predict`` requests wait (waits hold no thread);
- pending markers are claimed once, each with its final index (no window with a wrong index);
- the result cache is keyed on the version the worker ran; Label Studio's version follows the spec;
- interactive cache keys ignore region ids; a newer interactive request supersedes a queued one;
- bad input gets a 4xx at the door (webhook, interactive context, control options).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
import uvicorn
from conftest import INTERACTIVE_CONFIG, POLYGON_CONFIG, free_port, png_data_uri
from fastapi.testclient import TestClient
from rq.job import Job
from rq.serializers import JSONSerializer

from groundlabel.protocol import JobPayload, result_key
from groundlabel.redis_queue import PENDING_PREFIX, RESULT_PREFIX
from groundlabel.settings import Settings
from groundlabel.spec import parse_label_config
from groundlabel.versions import versioned
from labeling_backend.app import create_app
from labeling_backend.queue import RedisJobQueue
from labeling_backend.service import cache_key

pytestmark = pytest.mark.integration

AUTH = "Basic " + base64.b64encode(b"u:p").decode()


def settings_for(redis_url: str, **kw) -> Settings:
    base = dict(
        redis_url=redis_url,
        predict_timeout=0.3,
        interactive_timeout=0.3,
        model_version=None,
        basic_auth_user="u",
        basic_auth_pass="p",
        api_token=None,
    )
    base.update(kw)
    return Settings.from_env({}, **base)


class Server:
    """``create_app(settings)`` on uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings, model_version: str = "gem-test") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings, model_version=model_version)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server(redis_url):
    s = Server(settings_for(redis_url, predict_timeout=8.0, max_body_bytes=1024 * 1024))
    yield s
    s.stop()


def raw_post(port: int, path: str, headers: dict[str, str], body_part: bytes, timeout: float = 5.0) -> bytes:
    """Send a request's headers and only the first part of its body; the answer read before the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(head.encode() + b"\r\n" + body_part)
        data = b""
        try:
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
                    if length and len(rest) >= int(length[0].split(b":")[1]):
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data


# -- item 1: the door -------------------------------------------------------------------------------


def test_unauthenticated_huge_body_is_refused_before_it_is_read(server):
    # 300 MB announced, 64 KB sent: the answer must come from the headers alone.
    headers = {"Content-Type": "application/json", "Content-Length": str(300 * 1024 * 1024)}
    answer = raw_post(server.port, "/predict", headers, b"{" + b" " * 65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    answer = raw_post(server.port, "/webhook", headers, b"{")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_authenticated_body_over_the_cap_gets_413_before_it_is_read(server):
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(300 * 1024 * 1024),
        "Authorization": AUTH,
    }
    answer = raw_post(server.port, "/predict", headers, b"{" + b" " * 65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"GROUNDLABEL_MAX_BODY_BYTES" in answer


def test_chunked_body_over_the_cap_gets_413(server):
    def chunks():
        for _ in range(40):  # 2.5 MB against a 1 MB cap
            yield b" " * 65536

    r = httpx.post(
        server.url + "/predict",
        content=chunks(),
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413


def test_health_stays_open_and_small_bodies_pass(server):
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    body = {"tasks": [{"id": 1, "data": {"image": png_data_uri()}}], "label_config": POLYGON_CONFIG}
    r = httpx.post(server.url + "/predict", json=body, headers={"Authorization": AUTH}, timeout=10)
    assert r.status_code == 200, r.text


# -- item 2: /health under load ---------------------------------------------------------------------


def test_health_answers_while_sixty_predicts_wait(server):
    """60 requests wait for jobs no worker runs; /health must not queue behind them."""

    def predict(i: int) -> int:
        body = {
            "tasks": [{"id": 5000 + i, "data": {"image": png_data_uri(seed=i)}}],
            "label_config": POLYGON_CONFIG,
        }
        return httpx.post(
            server.url + "/predict", json=body, headers={"Authorization": AUTH}, timeout=30
        ).status_code

    with ThreadPoolExecutor(60) as pool:
        futures = [pool.submit(predict, i) for i in range(60)]
        time.sleep(3.0)  # they are waiting now (predict_timeout is 8 s)
        start = time.monotonic()
        r = httpx.get(server.url + "/health", timeout=10)
        took = time.monotonic() - start
        waiting = sum(not f.done() for f in futures)
        statuses = [f.result() for f in futures]
    assert r.status_code == 200
    assert waiting >= 50
    assert took < 1.0, f"/health took {took:.2f} s while {waiting} /predict requests waited"
    assert statuses == [200] * 60


# -- item 5: pending markers ------------------------------------------------------------------------


def test_pending_markers_are_written_once_with_their_final_index(redis_url):
    """A concurrent reader must never see a marker pointing at another task's place in the job."""
    settings = settings_for(redis_url)
    queue = RedisJobQueue(settings.queue)
    spec = parse_label_config(POLYGON_CONFIG)
    conn = redis.Redis.from_url(redis_url)
    conn.set(PENDING_PREFIX + "k100", "otherjob:0")  # task 100 is being computed by another job
    seen: list[str] = []
    monitor_conn = redis.Redis.from_url(redis_url)
    ready = threading.Event()

    def watch() -> None:
        with monitor_conn.monitor() as m:
            ready.set()
            for command in m.listen():
                seen.append(command["command"])
                if "STOP-MONITOR" in command["command"]:
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    tasks = [{"id": i, "data": {"image": f"http://x/{i}.png"}} for i in (100, 101, 102)]
    job_id, taken = queue.submit(JobPayload(tasks, spec), ["k100", "k101", "k102"], interactive=False)
    conn.get("STOP-MONITOR")
    thread.join(5)
    assert taken == [1, 2]
    assert queue.pending_get(["k101", "k102"]) == [(job_id, 0), (job_id, 1)]
    written = [
        c
        for c in seen
        if c.upper().startswith("SET ") and any(PENDING_PREFIX + k in c for k in ("k101", "k102"))
    ]
    assert len(written) == 2, f"each marker is written once, with its final index: {written}"
    assert f"{job_id}:0" in written[0] and f"{job_id}:1" in written[1]
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert [t["id"] for t in job.args[0]["tasks"]] == [101, 102]
    queue.close()


# -- item 8: model versions -------------------------------------------------------------------------


def test_setup_version_follows_the_label_config_options(redis_url):
    app = create_app(
        settings_for(redis_url, basic_auth_user=None, basic_auth_pass=None), model_version="gem-x"
    )
    with TestClient(app) as client:
        low = POLYGON_CONFIG.replace('model_score_threshold="0.0"', 'model_score_threshold="0.2"')
        a = client.post("/setup", json={"project": "1", "schema": POLYGON_CONFIG}).json()["model_version"]
        b = client.post("/setup", json={"project": "1", "schema": low}).json()["model_version"]
        again = client.post("/setup", json={"project": "1", "schema": POLYGON_CONFIG}).json()["model_version"]
    assert a != b and a == again
    assert a.startswith("gem-x-cfg") and a == versioned("gem-x", parse_label_config(POLYGON_CONFIG))


def test_result_cache_is_keyed_on_the_version_the_worker_ran(redis_url):
    """A prediction cached by a worker running another model is not served under the announced one."""
    app = create_app(
        settings_for(redis_url, basic_auth_user=None, basic_auth_pass=None), model_version="gem-big"
    )
    conn = redis.Redis.from_url(redis_url)
    body = {"tasks": [{"id": 1, "data": {"image": png_data_uri()}}], "label_config": POLYGON_CONFIG}
    with TestClient(app) as client:
        client.post("/predict", json=body)
        (marker,) = conn.keys(PENDING_PREFIX + "*")
        key = marker.decode()[len(PENDING_PREFIX) :]
        tiny = {"result": [{"id": "t"}], "score": 0.1, "model_version": "gem-tiny"}
        conn.set(RESULT_PREFIX + result_key(key, "gem-tiny"), json.dumps(tiny))
        assert client.post("/predict", json=body).json()["results"] == [[]]
        big = {"result": [{"id": "b"}], "score": 0.9, "model_version": "gem-big"}
        conn.set(RESULT_PREFIX + result_key(key, "gem-big"), json.dumps(big))
        (answer,) = client.post("/predict", json=body).json()["results"]
    assert answer["result"] == [{"id": "b"}]
    assert answer["model_version"] == versioned("gem-big", parse_label_config(POLYGON_CONFIG))


# -- item 9: interactive cache keys -----------------------------------------------------------------


def test_interactive_cache_key_ignores_region_ids():
    spec = parse_label_config(INTERACTIVE_CONFIG)
    spec_json = json.dumps(spec.to_dict(), sort_keys=True)
    task = {"id": 3, "data": {"image": "http://x/a.png"}}

    def context(region_id: str, text: str = "the cat") -> dict:
        region = {"id": region_id, "type": "textarea", "from_name": "prompt", "to_name": "image"}
        return {"result": [{**region, "value": {"text": [text]}, "origin": "manual"}]}

    assert cache_key(task, spec, spec_json, context("a1")) == cache_key(task, spec, spec_json, context("zz9"))
    assert cache_key(task, spec, spec_json, context("a1")) != cache_key(
        task, spec, spec_json, context("a1", "dog")
    )


# -- item 4: a newer interactive request supersedes a queued one ------------------------------------


def test_newer_interactive_job_supersedes_the_queued_one(redis_url):
    settings = settings_for(redis_url)
    queue = RedisJobQueue(settings.queue)
    spec = parse_label_config(INTERACTIVE_CONFIG)
    task = {"id": 7, "data": {"image": "http://x/7.png"}}

    def ctx(text: str) -> dict:
        return {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": [text]}}]}

    old, _ = queue.submit(JobPayload([task], spec, context=ctx("cat")), ["c1"], interactive=True)
    new, _ = queue.submit(JobPayload([task], spec, context=ctx("dog")), ["c2"], interactive=True)
    states = queue.poll([old, new])
    assert states[old].status == "failed" and "superseded" in (states[old].error or "")
    assert states[new].status == "pending"
    assert queue.pending_get(["c1"]) == [None]
    assert queue.queues["interactive"].job_ids == [new]
    payload = Job.fetch(new, connection=queue.connection, serializer=JSONSerializer).args[0]
    assert payload["deadline"] <= time.time() + settings.queue.interactive_job_timeout
    queue.close()


# -- item 12: bad input gets a 4xx ------------------------------------------------------------------


@pytest.fixture
def client(redis_url):
    app = create_app(
        settings_for(redis_url, basic_auth_user=None, basic_auth_pass=None), model_version="gem-x"
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    "annotation",
    [{"result": 500}, {"result": [{"type": "textarea", "value": "x"}]}, {"result": ["x"]}],
)
def test_malformed_webhook_annotation_gets_422(client, annotation):
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    "value",
    [
        {"x": "abc", "y": 10, "keypointlabels": ["Thing"]},
        {"x": 10, "y": 10, "keypointlabels": "Thing"},
        {"x": 10, "y": None, "keypointlabels": ["Thing"]},
    ],
)
def test_malformed_interactive_context_gets_422_at_the_door(client, redis_url, value):
    context = {
        "result": [{"type": "keypointlabels", "from_name": "click", "to_name": "image", "value": value}]
    }
    body = {
        "tasks": [{"id": 1, "data": {"image": png_data_uri()}}],
        "label_config": INTERACTIVE_CONFIG,
        "params": {"context": context},
    }
    r = client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    assert "context" in r.json()["detail"]
    assert redis.Redis.from_url(redis_url).keys("rq:job:*") == []  # no job was queued


@pytest.mark.parametrize(
    "attribute",
    [
        'model_score_threshold="abc"',
        'model_score_threshold="nan"',
        'model_score_threshold="1.5"',
        'polygon_tolerance="-5"',
    ],
)
def test_setup_refuses_bad_control_options(client, attribute):
    schema = POLYGON_CONFIG.replace('model_score_threshold="0.0"', attribute)
    r = client.post("/setup", json={"project": "1", "schema": schema})
    assert r.status_code == 400, r.text
    assert attribute.split("=")[0] in r.json()["detail"]


# -- item 13: the default threshold -----------------------------------------------------------------


def test_default_threshold_setting_applies_to_controls_without_one(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url, "GROUNDLABEL_DEFAULT_THRESHOLD": "0.05"})
    app = create_app(settings, model_version="gem-x")
    config = POLYGON_CONFIG.replace(' model_score_threshold="0.0"', "")
    spec = app.state.backend.spec(config)
    assert spec.controls[0].options["model_score_threshold"] == "0.05"
    kept = app.state.backend.spec(POLYGON_CONFIG)  # a control's own threshold wins
    assert kept.controls[0].options["model_score_threshold"] == "0.0"
    with pytest.raises(Exception, match="GROUNDLABEL_DEFAULT_THRESHOLD"):
        Settings.from_env({"GROUNDLABEL_DEFAULT_THRESHOLD": "2"})
    app.state.backend.close()


# -- item 16: small payloads ------------------------------------------------------------------------


def test_failed_job_keeps_its_inline_images_only_while_it_may_be_retried(redis_url):
    """The failure callback drops the data URIs of a job with no retry left, and keeps a retried one's."""
    from groundlabel.redis_queue import forget_payload

    settings = settings_for(redis_url)
    queue = RedisJobQueue(settings.queue)
    spec = parse_label_config(POLYGON_CONFIG)
    image = png_data_uri(120, 90, seed=9)
    job_id, _ = queue.submit(
        JobPayload([{"id": 9, "data": {"image": image}}], spec), ["p9"], interactive=False
    )
    conn = redis.Redis.from_url(redis_url)

    def stored() -> str:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer).args[0]["tasks"][0]["data"][
            "image"
        ]

    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.retries_left == settings.queue.job_retries > 0
    forget_payload(job, conn)  # a retry will need the image
    assert stored() == image
    job.retries_left = 0
    forget_payload(job, conn)  # the last attempt failed
    assert image not in stored() and "dropped after the job" in stored()
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).args[0]["tasks"][0]["id"] == 9
    queue.close()
