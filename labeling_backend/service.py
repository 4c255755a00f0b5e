"""Answering a ``/predict``: result cache, job chunking, waiting with a deadline.

Tasks found in the result cache are answered at once. The others are split into jobs of
``GROUNDLABEL_CHUNK_SIZE`` tasks (one model batch each; an interactive request is one job on the
``interactive`` queue) unless a job already computes them. The request then waits for its jobs until its
deadline without holding a thread: the runner's :meth:`~groundlabel.protocol.JobRunner.wait` returns as
soon as a job ends (a blocking read on Redis, or the in-process job's future), and the states are read
again at least every 3 seconds. Each job carries that deadline: the worker fetches no image after it, and
what it finished by then fills the cache for a later request.

Model versions: the result cache is keyed on the version each prediction was made with (the worker's
engine), looked up under every version the configured engines give. Label Studio sees each version
followed by ``-cfg<hash of the label spec>`` (:func:`groundlabel.versions.versioned`), unless the
operator named every prediction (``GROUNDLABEL_MODEL_VERSION``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from groundlabel.ls_format import context_regions, is_interactive
from groundlabel.protocol import (
    QUEUE_BATCH,
    QUEUE_INTERACTIVE,
    JobPayload,
    JobRunner,
    JobState,
    result_key,
)
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec
from groundlabel.versions import versioned
from labeling_backend.metrics import Metrics

T = TypeVar("T")

#: The fields of a context region that change a prediction; ids, scores and origins do not.
CONTEXT_FIELDS = ("type", "from_name", "to_name", "value", "is_positive")
#: The longest a request waits between two reads of its jobs' states (a missed notification, a reaped job).
RECHECK_SECONDS = 3.0


def context_for_key(context: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """What of an interactive context keys the result cache: each region's kind, names and value.

    Region ids change with every edit in Label Studio; leaving them out lets a retyped prompt or a
    repeated click hit the cache.
    """
    regions = context_regions(context)
    if not regions:
        return None
    return [{k: r[k] for k in CONTEXT_FIELDS if r.get(k) is not None} for r in regions]


#: Strings longer than this (inline images) enter a cache key by their own SHA-256, so that keying a task
#: never serializes its image.
DIGEST_CHARS = 1024
#: Characters of a long string encoded and hashed at a time: no step holds the GIL for long.
_DIGEST_SLICE = 1 << 18


def _keyed(value: Any) -> Any:
    """``value`` as it enters a cache key: a long string by its digest, anything else as it is."""
    if not isinstance(value, str) or len(value) <= DIGEST_CHARS:
        return value
    digest = hashlib.sha256()
    for start in range(0, len(value), _DIGEST_SLICE):
        digest.update(value[start : start + _DIGEST_SLICE].encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()


def cache_key(
    task: dict[str, Any],
    spec: LabelingSpec,
    spec_json: str,
    context: dict[str, Any] | None,
) -> str:
    """The task's key: (task, image, expression, spec, context); the model version is added per engine."""
    data = task.get("data") or {}
    blob = json.dumps(
        {
            "task": task.get("id"),
            "image": _keyed(data.get(spec.image_key)),
            "text": _keyed(data.get(spec.text_key)) if spec.text_key else None,
            "spec": spec_json,
            "context": context_for_key(context),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def named_prediction(
    prediction: dict[str, Any], spec: LabelingSpec, operator_name: str | None
) -> dict[str, Any]:
    """The prediction under the name Label Studio keeps: the operator's (``GROUNDLABEL_MODEL_VERSION``),
    else the engine's followed by the spec's tag (:func:`groundlabel.versions.versioned`)."""
    if operator_name:
        return {**prediction, "model_version": operator_name}
    return {**prediction, "model_version": versioned(str(prediction.get("model_version")), spec)}


@dataclass
class TaskAnswer:
    """One task's outcome: a prediction, or the reason there is none (``key``: its result-cache key)."""

    task_id: int
    prediction: dict[str, Any] | None = None
    error: str | None = None
    source: str = ""
    key: str = ""


@dataclass
class _Waiting:
    index: int  # into the request's tasks
    key: str
    job_id: str
    job_index: int


@dataclass
class PredictOutcome:
    """All answers of one request, in task order, and the model version announced for its spec."""

    answers: list[TaskAnswer]
    interactive: bool
    jobs: list[str] = field(default_factory=list)
    model_version: str = ""


class Dispatcher:
    """Answers validated tasks for a label spec: from the result cache, or through jobs on a runner.

    ``model_version`` is the version the backend announces, ``versions`` the names the configured
    engines give their predictions (the result cache is read under each of them; default: the announced
    one). Each answer keeps the model version its engine gave it, followed by the spec's tag, unless the
    operator named every prediction (``GROUNDLABEL_MODEL_VERSION``).
    """

    def __init__(
        self,
        settings: Settings,
        runner: JobRunner,
        metrics: Metrics,
        model_version: str,
        versions: Sequence[str] = (),
        project: str | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics
        self.model_version = model_version
        self.project = project  # a trained version promoted for it answers its expressions
        self.stopping = stopping  # set when the server stops: waits end at once
        named = settings.backend.model_version
        self.versions = [named] if named else list(dict.fromkeys(versions or [model_version]))

    def announced(self, spec: LabelingSpec) -> str:
        """The model version Label Studio sees for ``spec`` (see :func:`groundlabel.versions.versioned`)."""
        if self.settings.backend.model_version:
            return self.settings.backend.model_version
        return versioned(self.model_version, spec)

    def _named(self, prediction: dict[str, Any], spec: LabelingSpec) -> dict[str, Any]:
        return named_prediction(prediction, spec, self.settings.backend.model_version)

    @staticmethod
    async def _call(fn: Callable[..., T], *args: Any) -> T:
        """A (short, blocking) runner call on a worker thread, so that the event loop never waits on it."""
        return await anyio.to_thread.run_sync(fn, *args)

    def answer_blocking(
        self, tasks: list[dict[str, Any]], spec: LabelingSpec, **kwargs: Any
    ) -> PredictOutcome:
        """:meth:`answer` from synchronous code (its own event loop)."""
        return asyncio.run(self.answer(tasks, spec, **kwargs))

    async def _cache_get(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """The cached prediction of each task key under the first engine version that has one."""
        if not keys:
            return []
        return await self._call(self.cache_hits, keys)

    def cache_hits(self, keys: list[str]) -> list[dict[str, Any] | None]:
        """The cached prediction of each task key (blocking; :meth:`_cache_get` from the event loop)."""
        if not keys:
            return []
        n = len(self.versions)
        flat = [result_key(k, v) for k in keys for v in self.versions]
        hits = self.runner.cache_get(flat)
        return [next((h for h in hits[i * n : (i + 1) * n] if h is not None), None) for i in range(len(keys))]

    async def answer(
        self,
        tasks: list[dict[str, Any]],
        spec: LabelingSpec,
        *,
        context: dict[str, Any] | None = None,
        label_studio_url: str | None = None,
        timeout: float | None = None,
        detach: bool = False,
    ) -> PredictOutcome:
        """Answer every task, waiting at most ``timeout`` seconds (the configured one by default).

        ``detach``: the jobs do not stop at this request's deadline (a background run takes over the tasks
        they have not finished by then); otherwise no job fetches an image after it."""
        interactive = is_interactive(context)
        if timeout is None:
            backend = self.settings.backend
            timeout = backend.interactive_timeout if interactive else backend.predict_timeout
        deadline = time.monotonic() + timeout
        spec_json = json.dumps(spec.to_dict(), sort_keys=True)
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

        # One trip to a worker thread: the tasks' keys, the cache look-up, then the jobs for what it misses.
        waiting: list[_Waiting] = []
        if todo:
            waiting = await self._call(
                self._look_up_and_enqueue,
                tasks,
                todo,
                answers,
                spec_json,
                spec,
                context,
                label_studio_url,
                interactive,
                None if detach else time.time() + timeout,
            )
        jobs = sorted({w.job_id for w in waiting})
        if waiting:
            await self._wait(waiting, answers, deadline, timeout, interactive, spec)

        for answer in answers:
            self.metrics.tasks.labels(answer.source or "unknown").inc()
            if answer.prediction is None:
                self.metrics.failures.labels(answer.source or "unknown").inc()
        return PredictOutcome(answers, interactive, jobs, self.announced(spec))

    def _look_up_and_enqueue(
        self, tasks, todo, answers, spec_json, spec, context, label_studio_url, interactive, deadline
    ) -> list[_Waiting]:
        """Key the tasks of ``todo``, answer them from the cache where it can and enqueue jobs for the rest
        (on a worker thread: hashing and serializing large inline images never runs on the event loop)."""
        keys = {i: cache_key(tasks[i], spec, spec_json, context) for i in todo}
        for i in todo:
            answers[i].key = keys[i]
        missing = []
        for i, hit in zip(todo, self.cache_hits([keys[i] for i in todo]), strict=True):
            if hit is not None:
                answers[i].prediction = self._named(hit, spec)
                answers[i].source = "cache"
            else:
                missing.append(i)
        if not missing:
            return []
        return self._enqueue(tasks, missing, keys, spec, context, label_studio_url, interactive, deadline)

    def enqueue_batch(
        self, tasks: list[dict[str, Any]], keys: list[str], spec: LabelingSpec, label_studio_url: str | None
    ) -> dict[int, tuple[str, int]]:
        """Batch jobs, with no deadline of a request, for ``tasks`` (``{"id", "data"}``) whose ``keys`` no
        job computes yet; each task id's (job id, index) where one took it or already computes it."""
        index = dict(enumerate(keys))
        waiting = self._enqueue(tasks, list(index), index, spec, None, label_studio_url, False, None)
        return {int(tasks[w.index]["id"]): (w.job_id, w.job_index) for w in waiting if w.job_id}

    def _enqueue(
        self, tasks, missing, keys, spec, context, label_studio_url, interactive, deadline
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
                deadline=deadline,
                project=self.project,
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

    def _stopping(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    async def _pause(self, job_ids: list[str], timeout: float) -> None:
        """The runner's wait for ``job_ids``, cut short when the server begins to stop."""
        if self.stopping is None:
            await self.runner.wait(job_ids, timeout)
            return
        if self.stopping.is_set():
            return
        waits = [
            asyncio.ensure_future(self.runner.wait(job_ids, timeout)),
            asyncio.ensure_future(self.stopping.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    async def _wait(self, waiting, answers, deadline, timeout, interactive, spec) -> None:
        queue_name = QUEUE_INTERACTIVE if interactive else QUEUE_BATCH
        open_jobs = {w.job_id for w in waiting if w.job_id}
        states: dict[str, JobState] = {}
        last_reap = time.monotonic()
        # Wait first: a job that has already ended wakes the wait at once, and a job just enqueued is not
        # done yet, so reading its state before waiting would only cost a round trip.
        await self._pause(sorted(open_jobs), min(RECHECK_SECONDS, max(0.0, deadline - time.monotonic())))
        while open_jobs:
            for job_id, state in (await self._call(self.runner.poll, sorted(open_jobs))).items():
                states[job_id] = state
                if state.status != "pending":
                    open_jobs.discard(job_id)
                    if state.latency is not None:
                        self.metrics.job_seconds.labels(queue_name).observe(state.latency)
                    if state.run_seconds is not None:
                        self.metrics.job_run_seconds.labels(queue_name).observe(state.run_seconds)
            now = time.monotonic()
            if not open_jobs or now >= deadline or self._stopping():
                break
            if now - last_reap >= RECHECK_SECONDS:
                await self._call(self.runner.reap_abandoned)
                last_reap = now
            await self._pause(sorted(open_jobs), min(RECHECK_SECONDS, max(0.0, deadline - now)))

        late = [w for w in waiting if not w.job_id]
        if late:
            for w, hit in zip(late, await self._cache_get([w.key for w in late]), strict=True):
                if hit is not None:
                    answers[w.index].prediction = self._named(hit, spec)
                    answers[w.index].source = "cache"
                else:
                    answers[w.index].error = "the task's job finished without a result; retry the request"
                    answers[w.index].source = "lost"

        for w in waiting:
            if not w.job_id:
                continue
            state = states.get(w.job_id)
            answer = answers[w.index]
            if (state is None or state.status == "pending") and self._stopping():
                answer.error = "the backend is stopping before the task's job finished; ask again"
                answer.source = "stopping"
            elif state is None or state.status == "pending":
                detail = f" ({state.detail})" if state and state.detail else ""
                answer.error = (
                    f"not finished within {timeout:g} s{detail}; what the job finishes by then is cached "
                    "and a later request for this task returns it"
                )
                answer.source = "timeout"
            elif state.status == "failed":
                answer.error = state.error or "the job failed"
                answer.source = "job_failed"
                await self._call(self.runner.release_pending, [w.key], w.job_id)
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
                    answer.prediction = self._named(prediction, spec)
                    answer.source = "job"
