"""How training jobs are laid out on Redis: their queue, one job per project, and their progress.

- The RQ queue ``train`` (:data:`~groundlabel.protocol.QUEUE_TRAIN`), JSON payloads
  (:class:`~groundlabel.protocol.TrainPayload`), consumed by ``groundlabel worker --queues train``.
- ``groundlabel:train-lock:<project>``: the id of the project's queued or running training job. A second
  request while it is queued or running gets the same id back instead of a new job; the job's success and
  failure callbacks (run in the worker) release it, and a lock whose job has ended is taken over.
- ``groundlabel:train-status:<project>``: JSON, the project's latest training job as it goes: ``job``,
  ``state`` (queued, started, finished, failed), ``stage``, ``epoch``/``epochs``, ``loss``, the held-out
  metrics of the current (``base``) and new model, the stored ``version``, whether it was ``promoted``,
  the ``reason``, and ``updated_at``. The backend's ``/metrics`` and ``/job_status`` read it.
- ``groundlabel:train-count:<project>``: annotations created or updated since the last automatic training
  (``GROUNDLABEL_TRAIN_EVERY``).
- ``groundlabel:train-projects``: the projects a training job has read from Label Studio, so known to
  exist; the backend's ``/metrics`` shows training series only for these (and those in the model store).

Projects are canonical Label Studio ids (:func:`groundlabel.ls_format.project_id`) in every key.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from groundlabel.protocol import QUEUE_TRAIN, TRAIN_FUNCTION, TrainPayload

LOCK_PREFIX = "groundlabel:train-lock:"
STATUS_PREFIX = "groundlabel:train-status:"
COUNT_PREFIX = "groundlabel:train-count:"
KNOWN_PROJECTS = "groundlabel:train-projects"
#: RQ callbacks of training jobs, by dotted path.
ON_SUCCESS = "groundlabel.training_queue.training_finished"
ON_FAILURE = "groundlabel.training_queue.training_failed"
#: Job states in which a project's training is still to come or going on.
ACTIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
#: How long a finished job's status stays readable (seconds).
STATUS_TTL = 30 * 24 * 3600


def train_queue(connection: redis.Redis, timeout: int) -> Queue:
    """The training queue with the JSON serializer; ``timeout``: seconds one training job may run."""
    return Queue(QUEUE_TRAIN, connection=connection, serializer=JSONSerializer, default_timeout=timeout)


def read_status(connection: redis.Redis, project: str) -> dict[str, Any] | None:
    """The project's latest training status, or None."""
    raw = connection.get(STATUS_PREFIX + project)
    return json.loads(raw) if raw else None


def write_status(connection: redis.Redis, project: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the project's training status; returns the new status."""
    status = read_status(connection, project) or {}
    if fields.get("job") and status.get("job") != fields["job"]:
        status = {}  # a new job starts a new status
    status.update(fields, updated_at=time.time())
    connection.set(STATUS_PREFIX + project, json.dumps(status), ex=STATUS_TTL)
    return status


def all_statuses(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every project's latest training status."""
    keys = sorted(connection.scan_iter(match=STATUS_PREFIX + "*", count=500))
    if not keys:
        return {}
    out = {}
    for key, raw in zip(keys, connection.mget(keys), strict=True):
        if raw:
            out[key.decode()[len(STATUS_PREFIX) :]] = json.loads(raw)
    return out


def remember_project(connection: redis.Redis, project: str) -> None:
    """Record that Label Studio answered for ``project`` (a training job read it)."""
    connection.sadd(KNOWN_PROJECTS, project)


def known_projects(connection: redis.Redis) -> set[str]:
    """The projects a training job has read from Label Studio."""
    return {p.decode() for p in connection.smembers(KNOWN_PROJECTS)}


def reap_abandoned(connection: redis.Redis) -> None:
    """Fail training jobs whose worker stopped renewing their lease (killed, lost machine): their failure
    callback records why and releases the project's lock."""
    StartedJobRegistry(
        QUEUE_TRAIN,
        connection=connection,
        serializer=JSONSerializer,
        death_penalty_class=TimerDeathPenalty,  # the callback may run off the main thread (the backend)
    ).cleanup()


def _active_job(connection: redis.Redis, job_id: str) -> bool:
    reap_abandoned(connection)
    job = Job.fetch_many([job_id], connection=connection, serializer=JSONSerializer)[0]
    return job is not None and job.get_status(refresh=False) in ACTIVE


def enqueue_training(
    connection: redis.Redis,
    payload: TrainPayload,
    *,
    timeout: int,
    result_ttl: int = STATUS_TTL,
    failure_ttl: int = STATUS_TTL,
) -> tuple[str, bool]:
    """Enqueue a training job for ``payload.project`` unless one is queued or running.

    Returns ``(job id, created)``: the existing job's id and False when the project already has one.
    """
    project = payload.project
    lock = LOCK_PREFIX + project
    for _ in range(5):
        job_id = uuid.uuid4().hex
        if connection.set(lock, job_id, nx=True, ex=timeout + 3600):
            write_status(connection, project, job=job_id, state="queued", trigger=payload.trigger)
            train_queue(connection, timeout).enqueue_call(
                TRAIN_FUNCTION,
                args=(payload.to_dict(),),
                timeout=timeout,
                result_ttl=result_ttl,
                failure_ttl=failure_ttl,
                job_id=job_id,
                description=f"train project {project}",
                meta={"project": project},
                on_success=Callback(ON_SUCCESS),
                on_failure=Callback(ON_FAILURE),
            )
            return job_id, True
        current = connection.get(lock)
        if current is None:
            continue
        current_id = current.decode()
        if _active_job(connection, current_id):
            return current_id, False
        with connection.pipeline() as pipe:  # take over the lock of an ended (or lost) job
            try:
                pipe.watch(lock)
                if pipe.get(lock) == current:
                    pipe.multi()
                    pipe.delete(lock)
                    pipe.execute()
            except redis.WatchError:
                pass
    raise RuntimeError(f"could not enqueue a training job for project {project}: its lock keeps changing")


def _release(connection: redis.Redis, project: str, job_id: str) -> None:
    lock = LOCK_PREFIX + project
    with connection.pipeline() as pipe:
        try:
            pipe.watch(lock)
            if pipe.get(lock) == job_id.encode():
                pipe.multi()
                pipe.delete(lock)
                pipe.execute()
        except redis.WatchError:
            pass


def training_finished(job: Any, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ success callback (in the worker): record the outcome, release the project's lock."""
    project = str((job.meta or {}).get("project") or "")
    if not project:
        return
    outcome = result if isinstance(result, dict) else {}
    write_status(connection, project, job=job.id, state="finished", stage="done", **outcome)
    _release(connection, project, job.id)


def training_failed(job: Any, connection: redis.Redis, exc_type: Any, exc: Any, tb: Any) -> None:
    """RQ failure callback (in the worker): record why, release the project's lock."""
    project = str((job.meta or {}).get("project") or "")
    if not project:
        return
    reason = str(exc) if exc is not None else "the training job failed"
    if getattr(exc_type, "__name__", "") == "AbandonedJobError":
        reason = "the training worker running this job stopped (killed, or its machine was lost)"
    elif exc_type is not None and not _is_user_error(exc_type):
        reason = f"{getattr(exc_type, '__name__', 'error')}: {reason}"
    write_status(connection, project, job=job.id, state="failed", reason=reason)
    _release(connection, project, job.id)


def _is_user_error(exc_type: Any) -> bool:
    from groundlabel.errors import UserError

    return isinstance(exc_type, type) and issubclass(exc_type, UserError)


def count_annotation(connection: redis.Redis, project: str, every: int) -> bool:
    """Count one new or updated annotation; True (and the count restarts) when it reaches ``every``."""
    if every <= 0:
        return False
    key = COUNT_PREFIX + project
    count = int(connection.incr(key))
    if count >= every:
        connection.delete(key)
        return True
    return False


def job_status(connection: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """A training job's state and progress for Label Studio's ``/job_status``; None when it is unknown."""
    reap_abandoned(connection)
    job = Job.fetch_many([job_id], connection=connection, serializer=JSONSerializer)[0]
    if job is None or job.origin != QUEUE_TRAIN:
        return None
    project = str((job.meta or {}).get("project") or "")
    status = read_status(connection, project) if project else None
    state = job.get_status(refresh=False)
    out: dict[str, Any] = {"job_status": state.value if state else "unknown", "project": project}
    if status and status.get("job") == job_id:
        out.update({k: v for k, v in status.items() if k not in ("job", "state")})
    if state == JobStatus.FAILED and "reason" not in out:
        result = job.latest_result()
        text = (getattr(result, "exc_string", None) or "the training job failed").strip()
        out["reason"] = text.splitlines()[-1]
    return out
