"""A real ``groundlabel worker`` against an unreliable or hostile Redis.

- Redis stops while a job runs and comes back (with its data): the worker stays up, stores the job's
  result once Redis answers again, and takes the next job.
- Redis comes back empty (restarted without persistence): the worker registers itself again, so
  ``/health`` counts it, and answers new jobs.
- ``/health`` counts a worker listening on both queues once.
- A job naming any function but groundlabel's own job function (or a foreign callback) is refused
  without running.
- A worker killed while it waits for a job leaves no connection behind that would take the next one.
- A job's bookkeeping costs the worker two Redis round trips.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest
import redis
from conftest import POLYGON_CONFIG, RedisServer, WorkerProcess, free_port, png_bytes, png_data_uri
from fastapi.testclient import TestClient
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from slow_http import SlowImageServer

from groundlabel.protocol import JOB_FUNCTION, JobPayload, QueueUnavailable, result_key
from groundlabel.settings import Settings
from groundlabel.spec import parse_label_config
from labeling_backend.app import create_app
from labeling_backend.queue import RedisJobQueue

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = parse_label_config(POLYGON_CONFIG)


def _payload(task_id: int, image: str) -> JobPayload:
    return JobPayload(tasks=[{"id": task_id, "data": {"image": image}}], spec=SPEC)


def _wait(condition, timeout: float, what: str, every: float = 0.1, log: WorkerProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (redis.RedisError, QueueUnavailable):
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}" + (f":\n{log.output()}" if log else "")
    )


def _finished(queue: RedisJobQueue, job_id: str):
    state = queue.poll([job_id])[job_id]
    assert state.status != "failed", state.error
    return state if state.status == "finished" else None


def test_worker_rides_out_a_redis_outage(tmp_path, tiny_gem_env):
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    persistent = ["--appendonly", "yes", "--dir", str(data)]
    server = RedisServer(port, extra_args=persistent)
    url = server.url
    worker = None
    with SlowImageServer(png_bytes(40, 30, seed=1), seconds=3.0) as slow:
        try:
            env = {**tiny_gem_env, "GROUNDLABEL_ALLOWED_HOSTS": slow.host}
            worker = WorkerProcess(url, env, heartbeat=0.5, log_path=tmp_path / "worker.log")
            worker.wait_ready(url, timeout=120)
            settings = Settings.from_env({}, redis_url=url, redis_timeout=1.0)
            queue = RedisJobQueue(settings.queue)
            with TestClient(create_app(settings, runner=queue, model_version="test-outage")) as client:
                assert client.get("/health").json()["workers"] == 1  # one worker on two queues

                # Redis stops while the job downloads its image, the job ends during the outage.
                job_id, taken = queue.submit(_payload(1, slow.url), ["outage-key"], interactive=True)
                assert taken == [0]
                assert slow.started.wait(60), worker.output()
                server.stop()
                time.sleep(5.0)  # the download (3 s) and the model run end while Redis is away
                assert worker.proc.poll() is None, f"the worker quit during the outage:\n{worker.output()}"

                server = RedisServer(port, extra_args=persistent)  # back, with its data
                state = _wait(lambda: _finished(queue, job_id), 30, "the job's result after the outage")
                assert len(state.results) == 1 and state.results[0]["result"], state.results
                assert queue.pending_get(["outage-key"]) == [None]  # the success callback ran
                assert slow.hits == 1  # the job ran once

                # Redis comes back empty: the worker registers itself again and takes new jobs.
                server.stop()
                shutil.rmtree(data)
                data.mkdir()
                time.sleep(1.0)
                server = RedisServer(port, extra_args=persistent)
                _wait(
                    lambda: client.get("/health").json().get("workers") == 1, 30, "the worker to re-register"
                )
                job_id, _ = queue.submit(_payload(2, png_data_uri(seed=2)), ["after-key"], interactive=False)
                state = _wait(lambda: _finished(queue, job_id), 30, "a job after Redis came back empty")
                assert state.results[0]["result"]
                assert worker.proc.poll() is None
                assert client.get("/health").json()["workers"] == 1
        finally:
            if worker is not None:
                worker.kill()
            server.stop()


def test_worker_refuses_foreign_job_functions(redis_url, start_worker, tiny_gem_env, tmp_path):
    worker = start_worker(redis_url, tiny_gem_env)
    worker.wait_ready(redis_url, timeout=120)
    conn = redis.Redis.from_url(redis_url)
    queue = Queue("interactive", connection=conn, serializer=JSONSerializer)
    target = tmp_path / "made-by-a-job"
    foreign = queue.enqueue("os.makedirs", str(target), retry=Retry(max=2))
    payload = _payload(3, png_data_uri(seed=3)).to_dict()
    bad_callback = queue.enqueue(JOB_FUNCTION, payload, on_success=Callback("os.makedirs"))
    ours = queue.enqueue(JOB_FUNCTION, payload)

    def status(job: Job) -> str:
        job.refresh()
        return JobStatus(job.get_status()).value

    _wait(lambda: status(ours) == "finished", 60, "groundlabel's own job", log=worker)
    for job in (foreign, bad_callback):
        _wait(lambda job=job: status(job) == "failed", 30, f"job {job.func_name} to be refused")
        assert "refused" in (job.latest_result().exc_string or ""), job.latest_result().exc_string
        assert worker.log_path.read_text().count(f"refused job {job.id}") == 1  # never retried
    assert not target.exists(), "a job naming os.makedirs ran"
    assert worker.proc.poll() is None
    conn.close()


def test_worker_killed_while_idle_does_not_swallow_the_next_job(redis_url, start_worker, tiny_gem_env):
    """RQ's scheduler runs in a child forked from the worker; when the worker is killed in its blocking
    dequeue, that child must not keep the worker's connection open, or Redis hands the next job to it."""
    queue = RedisJobQueue(Settings.from_env({}, redis_url=redis_url).queue)
    dead = start_worker(redis_url, tiny_gem_env, extra_args=["--no-preload"])
    dead.wait_ready(redis_url, timeout=120)
    conn = redis.Redis.from_url(redis_url)
    _wait(lambda: conn.keys("rq:scheduler:*"), 30, "the worker's scheduler to start", log=dead)
    dead.kill()
    alive = start_worker(redis_url, tiny_gem_env)
    alive.wait_ready(redis_url, timeout=120)
    job_id, _ = queue.submit(_payload(4, png_data_uri(seed=4)), ["killed-while-idle"], interactive=True)
    _wait(lambda: _finished(queue, job_id), 60, "the job to be run by the live worker", log=alive)
    conn.close()
    queue.close()


def test_a_job_costs_the_worker_two_round_trips_of_bookkeeping(redis_url, tiny_gem_env, monkeypatch):
    """Between its dequeue and its next one, a job's bookkeeping is two pipelines: one to start it, one
    to store its result with the result cache (RQ's own worker sends about a dozen)."""
    from redis.connection import AbstractConnection

    from workers import engines
    from workers.worker import build_worker

    settings = Settings.from_env(tiny_gem_env, redis_url=redis_url)
    previous = engines.settings()
    engines.configure(settings)
    queue = RedisJobQueue(settings.queue)
    worker = build_worker(settings.queue, heartbeat=60)  # no lease renewal during the job
    sends: list[int] = []
    original_send, original_execute = AbstractConnection.send_packed_command, worker.execute_job

    def counting_send(self, *args, **kwargs):
        sends.append(1)
        return original_send(self, *args, **kwargs)

    def counted_execute(job, job_queue):
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting_send)
        try:
            original_execute(job, job_queue)
        finally:
            monkeypatch.setattr(AbstractConnection, "send_packed_command", original_send)

    worker.execute_job = counted_execute
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # work() sets them
    try:
        job_id, _ = queue.submit(_payload(5, png_data_uri(seed=5)), ["two-trips"], interactive=True)
        assert worker.work(burst=True, max_jobs=1)
        state = queue.poll([job_id])[job_id]
        assert state.status == "finished", state
        assert state.results and state.results[0].get("result") is not None
        assert queue.cache_get([result_key("two-trips", state.results[0]["model_version"])])[0]
        assert len(sends) == 2, len(sends)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        engines.configure(previous)
        queue.close()
