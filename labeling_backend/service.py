"""Answering a ``/predict``: result cache, job chunking, waiting with a deadline.

Tasks found in the result cache are answered at once. The others are split into jobs of
``GROUNDLABEL_CHUNK_SIZE`` tasks (one model batch each; an interactive request is one job on the
``interactive`` queue) unless a job already computes them. The request then waits for its jobs until its
deadline; jobs that are not done keep running and fill the cache for a later request.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from labeling_backend.label_config import LabelingSpec
from labeling_backend.metrics import Metrics
from labeling_backend.queue import JobState
from labeling_backend.settings import QUEUE_BATCH, QUEUE_INTERACTIVE, Settings

#: Context region types that make a request interactive (a typed text prompt or a click / box).
INTERACTIVE_TYPES = ("textarea", "keypointlabels", "rectanglelabels")


class JobRunner(Protocol):
    """What :class:`labeling_backend.queue.RedisJobQueue` and the in-process runner both offer."""

    where: str

    def ping(self) -> None: ...
    def cache_get(self, keys: list[str]) -> list[dict[str, Any] | None]: ...
    def pending_get(self, keys: list[str]) -> list[tuple[str, int] | None]: ...
    def release_pending(self, keys: list[str], job_id: str) -> None: ...
    def submit(
        self, payload: dict[str, Any], keys: list[str], *, interactive: bool
    ) -> tuple[str, list[int]]: ...
    def poll(self, job_ids: list[str]) -> dict[str, JobState]: ...
    def reap_abandoned(self) -> None: ...
    def stats(self) -> dict[str, dict[str, int]]: ...
    def worker_count(self) -> int: ...
    def close(self) -> None: ...


def is_interactive(context: dict[str, Any] | None) -> bool:
    """Whether a request's context holds a text prompt, a click or a box."""
    if not context:
        return False
    return any(
        isinstance(r, dict) and r.get("type") in INTERACTIVE_TYPES for r in context.get("result") or []
    )


def cache_key(
    task: dict[str, Any],
    spec: LabelingSpec,
    spec_json: str,
    context: dict[str, Any] | None,
    model_version: str,
) -> str:
    """The result-cache key of one task: (task, image, expression, spec, context, model version)."""
    data = task.get("data") or {}
    blob = json.dumps(
        {
            "task": task.get("id"),
            "image": data.get(spec.image_key),
            "text": data.get(spec.text_key) if spec.text_key else None,
            "spec": spec_json,
            "context": context,
            "model_version": model_version,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class TaskAnswer:
    """One task's outcome: a prediction, or the reason there is none."""

    task_id: int
    prediction: dict[str, Any] | None = None
    error: str | None = None
    source: str = ""


@dataclass
class _Waiting:
    index: int  # into the request's tasks
    key: str
    job_id: str
    job_index: int


@dataclass
class PredictOutcome:
    """All answers of one request, in task order."""

    answers: list[TaskAnswer]
    interactive: bool
    jobs: list[str] = field(default_factory=list)


class Predictor:
    """Turns validated tasks and a label spec into per-task answers through a job runner."""

    def __init__(self, settings: Settings, runner: JobRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics

    def predict(
        self,
        tasks: list[dict[str, Any]],
        spec: LabelingSpec,
        *,
        context: dict[str, Any] | None = None,
        label_studio_url: str | None = None,
        timeout: float | None = None,
    ) -> PredictOutcome:
        """Answer every task, waiting at most ``timeout`` seconds (the configured one by default)."""
        interactive = is_interactive(context)
        if timeout is None:
            timeout = self.settings.interactive_timeout if interactive else self.settings.predict_timeout
        deadline = time.monotonic() + timeout
        mv = self.settings.model_version
        spec_dict = spec.to_dict()
        spec_json = json.dumps(spec_dict, sort_keys=True)
        answers = [TaskAnswer(int(t["id"])) for t in tasks]

        todo: list[int] = []
        for i, task in enumerate(tasks):
            image = (task.get("data") or {}).get(spec.image_key)
            if not isinstance(image, str) or not image.strip():
                answers[i].error = (
                    f"task {task['id']} has no {spec.image_key!r} image URL in its data "
                    f'(the label config\'s <Image value="${spec.image_key}">)'
                )
                answers[i].source = "invalid"
            else:
                todo.append(i)

        keys = {i: cache_key(tasks[i], spec, spec_json, context, mv) for i in todo}
        cached = self.runner.cache_get([keys[i] for i in todo])
        missing = []
        for i, hit in zip(todo, cached, strict=True):
            if hit is not None:
                answers[i].prediction = {**hit, "model_version": mv}
                answers[i].source = "cache"
            else:
                missing.append(i)

        waiting: list[_Waiting] = []
        if missing:
            waiting = self._enqueue(tasks, missing, keys, spec_dict, context, label_studio_url, interactive)
        jobs = sorted({w.job_id for w in waiting})
        if waiting:
            self._wait(waiting, answers, keys, deadline, timeout, interactive)

        for answer in answers:
            self.metrics.tasks.labels(answer.source or "unknown").inc()
            if answer.prediction is None:
                self.metrics.failures.labels(answer.source or "unknown").inc()
        return PredictOutcome(answers, interactive, jobs)

    def _enqueue(
        self, tasks, missing, keys, spec_dict, context, label_studio_url, interactive
    ) -> list[_Waiting]:
        waiting: list[_Waiting] = []
        pending = self.runner.pending_get([keys[i] for i in missing])
        fresh = []
        for i, marker in zip(missing, pending, strict=True):
            if marker is None:
                fresh.append(i)
            else:
                waiting.append(_Waiting(i, keys[i], marker[0], marker[1]))
        size = len(fresh) if interactive else self.settings.chunk_size
        for start in range(0, len(fresh), max(size, 1)):
            chunk = fresh[start : start + size]
            payload = {
                "tasks": [{"id": int(tasks[i]["id"]), "data": tasks[i].get("data") or {}} for i in chunk],
                "spec": spec_dict,
                "context": context,
                "label_studio_url": label_studio_url,
                "model_version": self.settings.model_version,
            }
            chunk_keys = [keys[i] for i in chunk]
            job_id, taken = self.runner.submit(payload, chunk_keys, interactive=interactive)
            for j, pos in enumerate(taken):
                waiting.append(_Waiting(chunk[pos], keys[chunk[pos]], job_id, j))
            others = [chunk[p] for p in range(len(chunk)) if p not in set(taken)]
            if others:  # another request enqueued them a moment ago: wait for its job
                for i, marker in zip(others, self.runner.pending_get([keys[i] for i in others]), strict=True):
                    if marker is not None:
                        waiting.append(_Waiting(i, keys[i], marker[0], marker[1]))
                    else:  # finished in between: read the cache at the end of the wait
                        waiting.append(_Waiting(i, keys[i], "", 0))
        return waiting

    def _wait(self, waiting, answers, keys, deadline, timeout, interactive) -> None:
        queue_name = QUEUE_INTERACTIVE if interactive else QUEUE_BATCH
        open_jobs = {w.job_id for w in waiting if w.job_id}
        states: dict[str, JobState] = {}
        seen_end: set[str] = set()
        interval = self.settings.poll_interval
        last_reap = time.monotonic()
        while open_jobs:
            for job_id, state in self.runner.poll(sorted(open_jobs)).items():
                if state.status != "pending":
                    states[job_id] = state
                    open_jobs.discard(job_id)
                    if job_id not in seen_end and state.latency is not None:
                        seen_end.add(job_id)
                        self.metrics.job_seconds.labels(queue_name).observe(state.latency)
                else:
                    states[job_id] = state
            now = time.monotonic()
            if not open_jobs or now >= deadline:
                break
            if now - last_reap >= 1.0:
                self.runner.reap_abandoned()
                last_reap = now
            time.sleep(min(interval, max(0.0, deadline - now)))
            interval = min(interval * 1.5, 0.25)

        late = [w for w in waiting if not w.job_id]
        if late:
            for w, hit in zip(late, self.runner.cache_get([w.key for w in late]), strict=True):
                if hit is not None:
                    answers[w.index].prediction = {**hit, "model_version": self.settings.model_version}
                    answers[w.index].source = "cache"
                else:
                    answers[w.index].error = "the task's job finished without a result; retry the request"
                    answers[w.index].source = "lost"

        for w in waiting:
            if not w.job_id:
                continue
            state = states.get(w.job_id)
            answer = answers[w.index]
            if state is None or state.status == "pending":
                detail = f" ({state.detail})" if state and state.detail else ""
                answer.error = (
                    f"not finished within {timeout:g} s{detail}; the job goes on and a later request "
                    "for this task returns its result"
                )
                answer.source = "timeout"
            elif state.status == "failed":
                answer.error = state.error or "the job failed"
                answer.source = "job_failed"
                self.runner.release_pending([w.key], w.job_id)
            else:
                results = state.results or []
                if w.job_index >= len(results):
                    answer.error = "the job returned fewer predictions than tasks"
                    answer.source = "job_failed"
                    continue
                prediction = results[w.job_index]
                if prediction.get("error"):
                    answer.error = str(prediction["error"])
                    answer.source = "task_error"
                else:
                    answer.prediction = {**prediction, "model_version": self.settings.model_version}
                    answer.source = "job"
