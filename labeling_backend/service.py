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
from typing import Any

from groundlabel.ls_format import is_interactive
from groundlabel.protocol import QUEUE_BATCH, QUEUE_INTERACTIVE, JobPayload, JobRunner, JobState
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec
from labeling_backend.metrics import Metrics


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


class Dispatcher:
    """Answers validated tasks for a label spec: from the result cache, or through jobs on a runner.

    ``model_version`` is the version the backend announces; it keys the result cache. Each answer keeps
    the model version its job gave it (the engine that produced it), unless the operator named every
    prediction (``GROUNDLABEL_MODEL_VERSION``).
    """

    def __init__(self, settings: Settings, runner: JobRunner, metrics: Metrics, model_version: str) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics
        self.model_version = model_version

    def _named(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction under the operator's one name for every prediction, when there is one."""
        named = self.settings.backend.model_version
        return {**prediction, "model_version": named} if named else prediction

    def answer(
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
            backend = self.settings.backend
            timeout = backend.interactive_timeout if interactive else backend.predict_timeout
        deadline = time.monotonic() + timeout
        mv = self.model_version
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
                answers[i].prediction = self._named(hit)
                answers[i].source = "cache"
            else:
                missing.append(i)

        waiting: list[_Waiting] = []
        if missing:
            waiting = self._enqueue(tasks, missing, keys, spec, context, label_studio_url, interactive)
        jobs = sorted({w.job_id for w in waiting})
        if waiting:
            self._wait(waiting, answers, keys, deadline, timeout, interactive)

        for answer in answers:
            self.metrics.tasks.labels(answer.source or "unknown").inc()
            if answer.prediction is None:
                self.metrics.failures.labels(answer.source or "unknown").inc()
        return PredictOutcome(answers, interactive, jobs)

    def _enqueue(
        self, tasks, missing, keys, spec, context, label_studio_url, interactive
    ) -> list[_Waiting]:
        waiting: list[_Waiting] = []
        pending = self.runner.pending_get([keys[i] for i in missing])
        fresh = []
        for i, marker in zip(missing, pending, strict=True):
            if marker is None:
                fresh.append(i)
            else:
                waiting.append(_Waiting(i, keys[i], marker[0], marker[1]))
        size = len(fresh) if interactive else self.settings.queue.chunk_size
        for start in range(0, len(fresh), max(size, 1)):
            chunk = fresh[start : start + size]
            payload = JobPayload(
                tasks=[{"id": int(tasks[i]["id"]), "data": tasks[i].get("data") or {}} for i in chunk],
                spec=spec,
                context=context,
                label_studio_url=label_studio_url,
                model_version=self.settings.backend.model_version,
            )
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
        interval = self.settings.backend.poll_interval
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
                    answers[w.index].prediction = self._named(hit)
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
                    answer.prediction = self._named(prediction)
                    answer.source = "job"
