"""Failures: a worker SIGKILLed mid-job (retried, then failed, never lost) and Redis going down (503)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
import redis
from conftest import POLYGON_CONFIG, RedisServer, png_bytes, png_data_uri
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from groundlabel.redis_queue import PENDING_PREFIX
from groundlabel.settings import Settings
from labeling_backend.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class SlowImageServer:
    """Serves a PNG after ``delay`` seconds: a job fetching from it stays running that long."""

    def __init__(self, delay: float) -> None:
        stop = self.stop_event = threading.Event()
        body = png_bytes(seed=9)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                stop.wait(delay)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_of_task(conn: redis.Redis) -> Job:
    (key,) = conn.keys(PENDING_PREFIX + "*")
    job_id = conn.get(key).decode().rpartition(":")[0]
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def test_worker_killed_mid_job_is_retried_then_reported_failed(redis_url, tiny_gem_env, start_worker):
    server = SlowImageServer(delay=120)
    env = {**tiny_gem_env, "GROUNDLABEL_ALLOWED_HOSTS": f"127.0.0.1:{server.port}"}
    settings = Settings.from_env(
        {},
        redis_url=redis_url,
        predict_timeout=4,
        job_retries=1,
        retry_intervals=(0.0,),
        model_version="kill-test",
    )
    body = {
        "tasks": [{"id": 1, "data": {"image": f"http://127.0.0.1:{server.port}/slow.png"}}],
        "label_config": POLYGON_CONFIG,
    }
    conn = redis.Redis.from_url(redis_url)
    try:
        with TestClient(create_app(settings)) as client:
            # 1. A worker takes the job and is killed while the job runs.
            first = start_worker(redis_url, env, extra_args=["--no-preload"])
            first.wait_ready(redis_url, timeout=120)
            answer: dict = {}
            thread = threading.Thread(target=lambda: answer.update(client.post("/predict", json=body).json()))
            thread.start()
            wait_for(lambda: conn.keys(PENDING_PREFIX + "*"), 10, "the job to be enqueued")
            job = job_of_task(conn)
            wait_for(lambda: job.get_status() == JobStatus.STARTED, 60, "the worker to start the job")
            first.kill()
            thread.join(30)
            # The request does not hang: it answers at its deadline with the reason.
            (error,) = answer["errors"]
            assert answer["results"] == [[]] and "not finished within 4 s" in error["error"]
            # Its lease runs out and the clean-up re-queues it (one retry left): not lost.
            wait_for(lambda: job.get_status() == JobStatus.QUEUED, 20, "the abandoned job to be re-queued")
            assert job.get_status() == JobStatus.QUEUED
            job.refresh()
            assert job.retries_left == 0

            # 2. A second worker picks it up and dies too: no retry left, the job is marked failed and a
            # request for the same task returns that reason instead of waiting forever.
            second = start_worker(redis_url, env, extra_args=["--no-preload"])
            wait_for(lambda: job.get_status() == JobStatus.STARTED, 120, "the second worker to start the job")
            second.kill()
            start = time.monotonic()
            r = client.post("/predict", json={**body})
            elapsed = time.monotonic() - start
            (error,) = r.json()["errors"]
            assert job.get_status() == JobStatus.FAILED
            assert "worker running this job died" in error["error"], error
            assert elapsed < 4.0  # answered as soon as the failure was known, not at the deadline
            # The failed job no longer blocks the task: the next request enqueues a fresh job.
            client.post("/predict", json={**body})
            assert job_of_task(conn).id != job.id
    finally:
        conn.close()
        server.close()


def test_redis_down_gives_503_and_health_says_so():
    own = RedisServer()
    settings = Settings.from_env({}, redis_url=own.url, predict_timeout=0.2, model_version="down-test")
    body = {"tasks": [{"id": 1, "data": {"image": png_data_uri()}}], "label_config": POLYGON_CONFIG}
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").json()["status"] == "UP"
            assert client.post("/predict", json=body).status_code == 200
            own.stop()
            r = client.post("/predict", json=body)
            assert r.status_code == 503
            assert "the job queue (Redis at redis://127.0.0.1:" in r.json()["detail"]
            assert "unreachable" in r.json()["detail"]
            assert r.headers["retry-after"] == "5"
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "DOWN" and "unreachable" in health.json()["reason"]
            assert "groundlabel_queue_up 0.0" in client.get("/metrics").text
            # /setup never needs Redis: Label Studio can still connect and read the model version.
            assert client.post("/setup", json={"project": "1.1", "schema": POLYGON_CONFIG}).status_code == 200
    finally:
        own.stop()
