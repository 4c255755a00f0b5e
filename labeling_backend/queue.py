"""The backend's job queue client: RQ on Redis, JSON payloads only, ``interactive`` before ``batch``.

A job is ``workers.jobs.run_job(payload)`` referenced by its dotted path
(:data:`~groundlabel.protocol.JOB_FUNCTION`); its payload and result are plain JSON
(:class:`rq.serializers.JSONSerializer`), so nothing a Redis client writes is ever unpickled. One job
holds a chunk of tasks that the worker runs as one model batch. The keys groundlabel keeps beside RQ's
(result cache, pending markers) are described in :mod:`groundlabel.redis_queue`.

A job whose worker died (SIGKILL, lost machine) stays "started" until its lease runs out (the worker
renews it every ``GROUNDLABEL_WORKER_HEARTBEAT`` seconds); the next clean-up (run by any worker, and by a
backend that waits for such a job) re-queues it while it has retries left, and marks it failed after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from rq import Callback, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from groundlabel.protocol import (
    JOB_FUNCTION,
    QUEUE_BATCH,
    QUEUE_INTERACTIVE,
    JobPayload,
    JobState,
    QueueUnavailable,
)
from groundlabel.redaction import redact
from groundlabel.redis_queue import (
    CLAIM_SCRIPT,
    CLEANUP_LOCK,
    ENQUEUING_PREFIX,
    FORGET_PAYLOAD,
    INTERACTIVE_PREFIX,
    PENDING_PREFIX,
    RESULT_PREFIX,
    STORE_RESULTS,
    connect,
    make_queues,
)
from groundlabel.settings import QueueSettings

log = logging.getLogger(__name__)

__all__ = ["QueueUnavailable", "RedisJobQueue"]


#: The fields of a job's hash that :meth:`RedisJobQueue.poll` reads (its state, not its payload).
STATE_FIELDS = (
    "status", "origin", "created_at", "enqueued_at", "started_at", "ended_at", "worker_name", "exc_info",
    "meta", "timeout", "result_ttl", "failure_ttl", "retries_left", "number_of_retries", "description",
)  # fmt: skip


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


class RedisJobQueue:
    """Enqueues prediction jobs, reads their results and the per-task result cache."""

    def __init__(self, settings: QueueSettings, connection: redis.Redis | None = None) -> None:
        if not settings.redis_url and connection is None:
            raise ValueError("RedisJobQueue needs REDIS_URL")
        self.settings = settings
        self.where = redact(settings.redis_url or "redis")
        self.connection = connection or connect(settings.redis_url or "", timeout=settings.redis_timeout)
        self.queues = make_queues(self.connection, settings)
        self._claim = self.connection.register_script(CLAIM_SCRIPT)
        self._async: dict[int, tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis]] = {}

    # -- errors --------------------------------------------------------------------------------------

    def _unavailable(self, exc: Exception) -> QueueUnavailable:
        return QueueUnavailable(f"the job queue (Redis at {self.where}) is unreachable: {redact(str(exc))}")

    def ping(self) -> None:
        """Raise :class:`QueueUnavailable` when Redis does not answer."""
        try:
            self.connection.ping()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    # -- the per-task result cache -------------------------------------------------------------------

    def cache_get(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """Cached predictions for ``keys`` (None where there is none)."""
        if not keys:
            return []
        try:
            raw = self.connection.mget([RESULT_PREFIX + k for k in keys])
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return [json.loads(r) if r else None for r in raw]

    def pending_get(self, keys: Sequence[str]) -> list[tuple[str, int] | None]:
        """For each key, the (job id, index) of a queued or running job that computes it."""
        if not keys:
            return []
        try:
            raw = self.connection.mget([PENDING_PREFIX + k for k in keys])
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        out: list[tuple[str, int] | None] = []
        for r in raw:
            if not r:
                out.append(None)
                continue
            job_id, _, index = r.decode().rpartition(":")
            out.append((job_id, int(index)))
        return out

    def release_pending(self, keys: Sequence[str], job_id: str) -> None:
        """Forget the pending markers of ``keys`` that still point at ``job_id``."""
        if not keys:
            return
        try:
            current = self.connection.mget([PENDING_PREFIX + k for k in keys])
            stale = [
                PENDING_PREFIX + k
                for k, v in zip(keys, current, strict=True)
                if v and v.decode().rpartition(":")[0] == job_id
            ]
            if stale:
                self.connection.delete(*stale)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(
        self, payload: JobPayload, keys: Sequence[str], *, interactive: bool
    ) -> tuple[str, list[int]]:
        """Enqueue one job for the tasks of ``payload`` that no other job is computing.

        Returns the job id and the indices (into ``payload.tasks``) it took; the other tasks already
        have a pending job (see :meth:`pending_get`). The job id is "" when it took none. The markers are
        claimed atomically, each with its index in the job, so a concurrent reader never sees a marker
        pointing at another task's place. An interactive job cancels the task's older interactive job
        while that one is still queued.
        """
        queue = self.queues[QUEUE_INTERACTIVE if interactive else QUEUE_BATCH]
        timeout = self.settings.timeout_for(interactive)
        job_id = uuid.uuid4().hex
        marker_ttl = timeout * (self.settings.job_retries + 1) + int(sum(self.settings.retry_intervals)) + 60
        try:
            claim_keys = [PENDING_PREFIX + k for k in keys] + [ENQUEUING_PREFIX + job_id]
            taken = [int(i) for i in self._claim(keys=claim_keys, args=[job_id, marker_ttl])]
            if not taken:
                return "", []
            if len(taken) < len(keys):
                payload = dataclasses.replace(payload, tasks=[payload.tasks[i] for i in taken])
                keys = [keys[i] for i in taken]
            deadline = time.time() + timeout - 5  # the worker stops fetching before RQ would kill the job
            if payload.deadline is None or payload.deadline > deadline:
                payload = dataclasses.replace(payload, deadline=deadline)
            retry = None
            if self.settings.job_retries > 0:
                retry = Retry(max=self.settings.job_retries, interval=list(self.settings.retry_intervals))
            with self.connection.pipeline() as pipe:  # one round trip: supersede, enqueue, unmark
                pipe.multi()  # RQ opens the transaction itself unless it is open already
                if interactive:
                    ttl = self.settings.interactive_job_timeout * (self.settings.job_retries + 1) + 60
                    for task in payload.tasks:
                        pipe.set(INTERACTIVE_PREFIX + str(task["id"]), job_id, ex=ttl, get=True)
                queue.enqueue_call(
                    JOB_FUNCTION,
                    args=(payload.to_dict(),),
                    timeout=timeout,
                    result_ttl=self.settings.job_result_ttl,
                    failure_ttl=self.settings.failure_ttl,
                    job_id=job_id,
                    retry=retry,
                    description=f"predict {len(payload.tasks)} task(s)",
                    meta={"cache_keys": list(keys), "cache_ttl": self.settings.result_ttl},
                    on_success=Callback(STORE_RESULTS),
                    on_failure=Callback(FORGET_PAYLOAD),
                    pipeline=pipe,
                )
                pipe.delete(ENQUEUING_PREFIX + job_id)
                replies = pipe.execute()
            if interactive:
                self._supersede(payload.tasks, replies[: len(payload.tasks)], job_id)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return job_id, taken

    def _supersede(self, tasks: Sequence[dict[str, Any]], previous: Sequence[Any], job_id: str) -> None:
        """Cancel the tasks' older interactive jobs (``previous``: the ids ``job_id`` replaced as their
        latest) that have not started."""
        for task, old_id in zip(tasks, previous, strict=True):
            if not old_id or old_id.decode() == job_id:
                continue
            old = Job.fetch_many([old_id.decode()], connection=self.connection, serializer=JSONSerializer)[0]
            if old is None or old.get_status(refresh=False) not in (JobStatus.QUEUED, JobStatus.SCHEDULED):
                continue
            old.cancel()
            self.release_pending(list((old.meta or {}).get("cache_keys") or []), old.id)
            log.info("interactive job %s for task %s superseded by %s", old.id, task["id"], job_id)

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The state of each job (one round trip: the jobs' state fields and their latest results, read
        together; never a job's payload, which may hold megabytes of inline images)."""
        ids = list(dict.fromkeys(j for j in job_ids if j))
        if not ids:
            return {}
        try:
            with self.connection.pipeline() as pipe:
                for job_id in ids:
                    pipe.hmget(Job.key_for(job_id), STATE_FIELDS)
                    pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
                replies = pipe.execute()
            states: dict[str, JobState] = {}
            for n, job_id in enumerate(ids):
                values, latest = replies[2 * n], replies[2 * n + 1]
                raw = {k: v for k, v in zip(STATE_FIELDS, values, strict=True) if v is not None}
                job = result = None
                if raw:
                    job = Job(job_id, connection=self.connection, serializer=JSONSerializer)
                    job.restore({**raw, "data": b""})
                if latest:
                    result_id, fields = latest[0]
                    result = Result.restore(
                        job_id, result_id.decode(), fields, self.connection, serializer=JSONSerializer
                    )
                states[job_id] = self._state(job_id, job, result)
            return states
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _state(self, job_id: str, job: Job | None, result: Result | None) -> JobState:
        if job is None:
            if self.connection.exists(ENQUEUING_PREFIX + job_id):
                return JobState("pending", detail="being enqueued")
            return JobState("failed", error=f"job {job_id} is gone from the queue (expired or deleted)")
        status = job.get_status(refresh=False)
        latency = run = None
        if job.enqueued_at and job.ended_at:
            latency = max(0.0, (job.ended_at - job.enqueued_at).total_seconds())
        if job.started_at and job.ended_at:
            run = max(0.0, (job.ended_at - job.started_at).total_seconds())
        if status == JobStatus.FINISHED:
            value = result.return_value if result and result.type == Result.Type.SUCCESSFUL else None
            if not isinstance(value, list):
                return JobState("failed", error=f"job {job_id} returned no prediction list", latency=latency)
            return JobState("finished", results=value, latency=latency, run_seconds=run)
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            text = getattr(result, "exc_string", None) or job.exc_info
            reason = _last_line(text)
            if "AbandonedJobError" in (text or ""):
                reason = "the worker running this job died (no retries left)"
            if status == JobStatus.CANCELED:
                reason = "superseded by a newer interactive request for the same task"
            return JobState("failed", error=f"job {job_id} {status.value}: {reason}", latency=latency)
        if status == JobStatus.STARTED:
            detail = f"running on worker {job.worker_name or '?'}"
        elif status == JobStatus.SCHEDULED:
            detail = "waiting to be retried"
        else:
            detail = f"{status.value if status else 'unknown'} in queue {job.origin!r}"
            position = None
            if status == JobStatus.QUEUED and job.origin in self.queues:
                position = self.queues[job.origin].get_job_position(job_id)
            if position is not None:
                detail += f" at position {position + 1}"
            if not self.worker_count():
                detail += "; no worker is listening on the queues"
        return JobState("pending", detail=detail)

    def _async_client(self) -> redis.asyncio.Redis:
        """An asyncio Redis client for the running event loop (one per loop, made on first use)."""
        loop = asyncio.get_running_loop()
        entry = self._async.get(id(loop))
        if entry is not None and entry[0] is loop:
            return entry[1]
        timeout = self.settings.redis_timeout
        read_timeout = max(timeout, 5.0) + 2.0  # longer than one blocking read
        if self.settings.redis_url:
            client = redis.asyncio.Redis.from_url(
                self.settings.redis_url, socket_connect_timeout=timeout, socket_timeout=read_timeout
            )
        else:  # a client handed in without a URL: the same server and database
            kw = self.connection.connection_pool.connection_kwargs
            client = redis.asyncio.Redis(
                host=kw.get("host", "localhost"),
                port=kw.get("port", 6379),
                db=kw.get("db", 0),
                username=kw.get("username"),
                password=kw.get("password"),
                socket_connect_timeout=timeout,
                socket_timeout=read_timeout,
            )
        self._async = {k: v for k, v in self._async.items() if not v[0].is_closed()}
        self._async[id(loop)] = (loop, client)
        return client

    async def wait(self, job_ids: Sequence[str], timeout: float) -> None:
        """Block on Redis until one of the jobs has a result (RQ's result stream), at most ``timeout`` s."""
        ids = [j for j in job_ids if j]
        if not ids or timeout <= 0:
            return
        streams = {Result.get_key(j): "0-0" for j in ids}
        try:
            await self._async_client().xread(streams, count=1, block=max(1, int(timeout * 1000)))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def worker_count(self) -> int:
        """Number of live workers registered on any of the queues, each counted once."""
        from rq import worker_registration

        try:
            return len(set().union(*(worker_registration.get_keys(queue=q) for q in self.queues.values())))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def reap_abandoned(self) -> None:
        """Re-queue or fail jobs whose worker stopped renewing their lease (at most once a second).

        Runs on a worker thread of the backend: the jobs' failure callbacks are timed with a timer thread
        (:class:`~rq.timeouts.TimerDeathPenalty`), not RQ's default ``SIGALRM``, which only the main
        thread may set."""
        try:
            if not self.connection.set(CLEANUP_LOCK, "1", nx=True, px=1000):
                return
            for queue in self.queues.values():
                StartedJobRegistry(
                    queue.name,
                    connection=self.connection,
                    serializer=JSONSerializer,
                    job_class=queue.job_class,
                    death_penalty_class=TimerDeathPenalty,
                ).cleanup()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    # -- monitoring ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Per queue: queued, started and failed job counts."""
        out: dict[str, dict[str, int]] = {}
        try:
            for name, queue in self.queues.items():
                out[name] = {
                    "queued": queue.count,
                    "started": StartedJobRegistry(name, connection=self.connection).get_job_count(
                        cleanup=False
                    ),
                    "failed": FailedJobRegistry(name, connection=self.connection).get_job_count(
                        cleanup=False
                    ),
                }
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return out

    def close(self) -> None:
        """Close the connection pool."""
        self.connection.close()
