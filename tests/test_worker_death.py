"""A worker killed with SIGKILL, idle or mid-job, against a real redis-server and real worker processes:

- the backend's clean-up (a worker thread) runs the abandoned job's failure callback without "signal
  only works in main thread": a job with no retry left drops its inline image, one with a retry keeps it
  and is scheduled again;
- the worker leaves no process behind (its scheduler is a thread, not a forked child);
- a replacement worker takes the scheduler over within a bounded time, and the scheduled retry runs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest
import redis
from conftest import POLYGON_CONFIG, png_data_uri
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from slow_http import SlowImageServer
from test_worker_serve_stop import _alive, _descendants

from groundlabel.protocol import QUEUE_NAMES, JobPayload
from groundlabel.settings import Settings
from groundlabel.spec import parse_label_config
from labeling_backend.queue import RedisJobQueue
from workers.worker import SCHEDULER_LOCK_TTL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOCK = "rq:scheduler-lock:"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def scheduler_pid(conn: redis.Redis, queue: str) -> int | None:
    """The pid of the process whose scheduler holds ``queue``'s scheduler lock, or None."""
    owner = conn.get(LOCK + queue)
    if owner is None:
        return None
    pid = conn.hget(f"rq:scheduler:{owner.decode()}", "pid")
    return int(pid) if pid else -1  # -1: held by a scheduler that left no record


def submit_stalled_job(redis_url: str, slow_url: str, *, retries: int) -> tuple[RedisJobQueue, str, str]:
    """A batch job of two tasks: an inline image, then one from a host that never finishes answering."""
    settings = Settings.from_env(
        {}, redis_url=redis_url, job_retries=retries, retry_intervals=(2.0,), model_version="death-test"
    )
    queue = RedisJobQueue(settings.queue)
    image = png_data_uri(120, 90, seed=4)
    tasks = [{"id": 1, "data": {"image": image}}, {"id": 2, "data": {"image": slow_url}}]
    job_id, _ = queue.submit(
        JobPayload(tasks, parse_label_config(POLYGON_CONFIG)), ["d1", "d2"], interactive=False
    )
    return queue, job_id, image


def stored_image(conn: redis.Redis, job_id: str) -> str:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer).args[0]["tasks"][0]["data"]["image"]


@pytest.mark.parametrize("retries", [0, 1], ids=["last-attempt", "retried"])
def test_the_backend_reaps_a_killed_workers_job_off_the_main_thread(
    retries, redis_url, tiny_gem_env, start_worker, caplog
):
    with SlowImageServer(png_data_uri().encode(), seconds=120) as slow:
        env = {**tiny_gem_env, "GROUNDLABEL_ALLOWED_HOSTS": slow.host}
        worker = start_worker(redis_url, env, extra_args=["--no-preload"])
        worker.wait_ready(redis_url, timeout=120)
        queue, job_id, image = submit_stalled_job(redis_url, slow.url, retries=retries)
        conn = redis.Redis.from_url(redis_url)
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert slow.started.wait(120), worker.output()
        assert job.get_status() == JobStatus.STARTED
        worker.kill(signal.SIGKILL)

        time.sleep(4.0)  # the lease (3 heartbeats of 0.5 s, + 1 s) runs out
        with caplog.at_level(logging.WARNING):
            reaper = threading.Thread(target=queue.reap_abandoned)  # as the backend does, off the main thread
            reaper.start()
            reaper.join(30)
        assert "signal only works in main thread" not in caplog.text
        assert "failure callback" not in caplog.text, caplog.text
        if retries:  # scheduled again after its interval, with its image
            assert job.get_status() == JobStatus.SCHEDULED and stored_image(conn, job_id) == image
        else:  # failed for good: the inline image is gone from the stored payload
            assert job.get_status() == JobStatus.FAILED
            assert "dropped after the job" in stored_image(conn, job_id)
        queue.close()
        conn.close()


def worker_pid(conn: redis.Redis, name: str | None) -> int | None:
    """The pid of the worker registered as ``name``."""
    if not name:
        return None
    pid = conn.hget(f"rq:worker:{name}", "pid")
    return int(pid) if pid else None


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-job"])
def test_a_killed_worker_leaves_no_process_and_its_scheduler_is_taken_over(
    busy, redis_url, tiny_gem_env, start_worker
):
    conn = redis.Redis.from_url(redis_url)
    with SlowImageServer(png_data_uri().encode(), seconds=120) as slow:
        env = {**tiny_gem_env, "GROUNDLABEL_ALLOWED_HOSTS": slow.host}
        first = start_worker(redis_url, env, extra_args=["--no-preload"])
        first.wait_ready(redis_url, timeout=120)
        wait_for(lambda: scheduler_pid(conn, QUEUE_NAMES[0]) == first.pid, 30, "the first worker's scheduler")
        if busy:  # the first worker runs a job with a retry left when it is killed
            queue, job_id, _ = submit_stalled_job(redis_url, slow.url, retries=1)
            assert slow.started.wait(120), first.output()
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            assert job.get_status() == JobStatus.STARTED and worker_pid(conn, job.worker_name) == first.pid
        second = start_worker(redis_url, env, extra_args=["--no-preload"])
        second.wait_ready(redis_url, timeout=120)

        children = _descendants(first.pid)
        first.kill(signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 3
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.1)
        left = [p for p in children if _alive(p)]
        assert not left, f"the killed worker left processes {left} running"

        # The other worker's scheduler holds every queue's scheduler lock within the lock's lifetime.
        for name in QUEUE_NAMES:
            wait_for(
                lambda name=name: scheduler_pid(conn, name) == second.pid,
                SCHEDULER_LOCK_TTL + 5,
                f"the second worker's scheduler to take {name}",
            )
        assert time.monotonic() - killed < SCHEDULER_LOCK_TTL + 5

        if busy:  # reaped by the second worker (a retry left), scheduled 2 s later, moved back, run there

            def retried_on_second() -> bool:
                again = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                return again.retries_left == 0 and worker_pid(conn, again.worker_name) == second.pid

            wait_for(retried_on_second, 60, "the retry to run on the second worker")
            queue.close()
    conn.close()
