"""The job protocol: what the backend asks of the workers, and what comes back.

A job is a chunk of tasks with the label spec they are predicted for; its payload and its result are plain
JSON, never pickle. The worker answers one prediction per task, in order:
``{"result": [...], "score": float, "model_version": str}`` (``"meta"`` may be added), or, for a task
that failed alone, the same with an empty ``result`` and ``"error"`` holding the reason.

``model_version`` on each prediction is the version of the engine that produced it, as the worker names
it (GEM, LAVT, or GEM standing in for LAVT: :mod:`groundlabel.versions`), unless the operator set one
name for every prediction (``GROUNDLABEL_MODEL_VERSION``), which the payload then carries.

Every job runner (RQ on Redis in the backend, child processes in the workers' in-process runner) offers
:class:`JobRunner`; the backend speaks to it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from groundlabel.spec import LabelingSpec

#: Queue names, in the order a worker listens to them: interactive requests before batches.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BATCH = "batch"
QUEUE_NAMES = (QUEUE_INTERACTIVE, QUEUE_BATCH)

#: The dotted path of the one job function workers run (RQ stores it by name).
JOB_FUNCTION = "workers.jobs.run_job"

#: The queue of training jobs, consumed by a training worker (``groundlabel worker --queues train``).
QUEUE_TRAIN = "train"
#: The dotted path of the training job function (the worker runs the body its command provides).
TRAIN_FUNCTION = "workers.jobs.run_training"


@dataclass
class TrainPayload:
    """One training job: the project to train on, where its Label Studio is, and why it was started."""

    project: str
    label_studio_url: str | None = None
    trigger: str = "START_TRAINING"  # START_TRAINING, /train, or the annotation count that triggered it

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the queue."""
        return {"project": self.project, "label_studio_url": self.label_studio_url, "trigger": self.trigger}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainPayload:
        """Inverse of :meth:`to_dict`."""
        return cls(
            project=str(data["project"]),
            label_studio_url=data.get("label_studio_url"),
            trigger=str(data.get("trigger") or "START_TRAINING"),
        )


@dataclass
class JobPayload:
    """One job: tasks (``{"id", "data"}``), the spec, the interactive context, where Label Studio is."""

    tasks: list[dict[str, Any]]
    spec: LabelingSpec
    context: dict[str, Any] | None = None
    label_studio_url: str | None = None
    model_version: str | None = None  # the operator's one name for every prediction, if any
    deadline: float | None = None  # Unix time after which the worker stops the job's remaining tasks
    project: str | None = None  # the Label Studio project: a trained version promoted for it answers

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the queue."""
        return {
            "tasks": [{"id": int(t["id"]), "data": t.get("data") or {}} for t in self.tasks],
            "spec": self.spec.to_dict(),
            "context": self.context,
            "label_studio_url": self.label_studio_url,
            "model_version": self.model_version,
            "deadline": self.deadline,
            "project": self.project,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPayload:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tasks=list(data.get("tasks") or []),
            spec=LabelingSpec.from_dict(data["spec"]),
            context=data.get("context") or None,
            label_studio_url=data.get("label_studio_url"),
            model_version=data.get("model_version"),
            deadline=data.get("deadline"),
            project=data.get("project"),
        )


#: Inline images longer than this are dropped from a job's stored payload once it will not run again.
INLINE_KEEP_CHARS = 256


def slim_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without its tasks' inline ``data:`` images, for keeping after the job's last run.

    Everything a later reader needs (task ids, spec, context, deadline) stays; each dropped value is
    replaced by a short note giving its size.
    """

    def slim(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("data:") and len(value) > INLINE_KEEP_CHARS:
            return f"{value[:32]}... ({len(value)} characters, dropped after the job)"
        return value

    tasks = [
        {**t, "data": {k: slim(v) for k, v in (t.get("data") or {}).items()}}
        for t in payload.get("tasks") or []
    ]
    return {**payload, "tasks": tasks}


def result_key(task_key: str, model_version: str) -> str:
    """The result-cache key of one task's prediction made by the engine named ``model_version``.

    ``task_key`` hashes what was asked (task, image, expression, spec, context); the version is the one
    the worker actually ran, so a worker with another model never fills the cache of the announced one.
    """
    return f"{task_key}@{model_version}"


def prediction(
    results: list[dict[str, Any]], score: float, model_version: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One task's prediction as a job returns it."""
    out: dict[str, Any] = {"result": results, "score": float(score), "model_version": model_version}
    if meta:
        out["meta"] = meta
    return out


def failed_prediction(reason: str, model_version: str) -> dict[str, Any]:
    """The answer for a task that failed alone: no regions, and the reason."""
    return {"result": [], "score": 0.0, "model_version": model_version, "error": reason}


@dataclass
class JobState:
    """What a job has come to: ``finished`` (with its per-task results), ``failed`` or ``pending``."""

    status: str
    results: list[dict[str, Any]] | None = None
    error: str | None = None
    detail: str = ""
    latency: float | None = None  # enqueue → end, seconds, for finished or failed jobs
    run_seconds: float | None = None  # the job function's own time on its worker, when known


class JobRunner(Protocol):
    """What every job runner offers the backend: a result cache, pending markers, jobs and their states."""

    where: str

    def ping(self) -> None: ...
    def cache_get(self, keys: list[str]) -> list[dict[str, Any] | None]: ...
    def pending_get(self, keys: list[str]) -> list[tuple[str, int] | None]: ...
    def release_pending(self, keys: list[str], job_id: str) -> None: ...
    def submit(self, payload: JobPayload, keys: list[str], *, interactive: bool) -> tuple[str, list[int]]: ...
    def poll(self, job_ids: list[str]) -> dict[str, JobState]: ...
    async def wait(self, job_ids: Sequence[str], timeout: float) -> None:
        """Return as soon as one of ``job_ids`` may have ended, or after ``timeout`` seconds."""
        ...

    def reap_abandoned(self) -> None: ...
    def stats(self) -> dict[str, dict[str, int]]: ...
    def worker_count(self) -> int: ...
    def close(self) -> None: ...


class QueueUnavailable(Exception):
    """The job queue cannot be reached; the message says where and why (without credentials)."""
