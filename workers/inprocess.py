"""Running jobs without Redis: a pool of spawned child processes next to the backend.

The process that holds the runner never imports torch; the children do (``workers.jobs.init_process``
configures them from the parent's settings and loads the engines once per child). Payloads and results
cross the process boundary as JSON text. It offers :class:`groundlabel.protocol.JobRunner`, like the
backend's Redis queue client, with an in-memory result cache.

The runner hands the pool one job per child at a time and keeps the rest in two queues of its own,
interactive before batch, as RQ workers take the ``interactive`` queue first: an annotator's request
waits for the jobs already running, never behind a whole project's batch. ``groundlabel serve`` with two
children or more (``GROUNDLABEL_WORKERS_INPROCESS``) keeps one of them for interactive requests, so they
do not even wait for a batch job.

No child outlives the backend: :meth:`InProcessRunner.close` (run when ``groundlabel serve`` stops, on
SIGTERM too) terminates the children, busy or not, and a child whose parent died without closing it
(SIGKILL) notices within a second and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from groundlabel.protocol import QUEUE_BATCH, QUEUE_INTERACTIVE, JobPayload, JobState, result_key
from groundlabel.settings import Settings
from workers.cache import LRUCache

log = logging.getLogger(__name__)


#: Seconds a child waits between two looks at whether its parent still lives.
PARENT_WATCH_INTERVAL = 1.0
#: Seconds :meth:`InProcessRunner.close` gives terminated children before killing them.
CHILD_STOP_TIMEOUT = 5.0


def _watch_parent(parent_pid: int) -> None:
    """Exit this child as soon as its parent is gone (re-parented children see another parent id)."""
    while True:
        time.sleep(PARENT_WATCH_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(1)


def init_child(settings: Settings, parent_pid: int) -> None:
    """Initialiser of a pool child: exit with the parent, then :func:`workers.jobs.init_process`."""
    from workers.jobs import init_process

    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    init_process(settings)


class _Job:
    def __init__(self, future: Future, keys: list[str], queue: str, text: str | None) -> None:
        self.future, self.keys, self.queue = future, keys, queue
        self.text = text  # the JSON payload, until a child takes it
        self.enqueued = time.monotonic()
        self.ended: float | None = None


class InProcessRunner:
    """Jobs in ``workers`` spawned child processes; results cached in memory."""

    def __init__(
        self,
        settings: Settings,
        workers: int | None = None,
        *,
        warm_up: bool = True,
        reserve_interactive: bool = False,
    ) -> None:
        self.settings = settings
        self.workers = int(workers or settings.backend.workers_inprocess)
        #: With two children or more, batch jobs leave one free for interactive requests (``serve``).
        self.batch_limit = self.workers - 1 if reserve_interactive and self.workers > 1 else self.workers
        self.where = "in-process"
        self._cache: LRUCache[dict[str, Any]] = LRUCache(100_000, ttl=settings.queue.result_ttl)
        self._pending: dict[str, tuple[str, int]] = {}
        self._jobs: dict[str, _Job] = {}
        self._queued: dict[str, deque[str]] = {QUEUE_INTERACTIVE: deque(), QUEUE_BATCH: deque()}
        self._running = 0  # jobs handed to the pool and not ended
        self._lock = threading.RLock()
        self._pool = self._new_pool()
        self._warm: Future | None = None
        if warm_up:
            from workers.jobs import warm_up as load_engines

            self._warm = self._pool.submit(load_engines)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(  # torch-free here: the children load the engines
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_child,
            initargs=(self.settings, os.getpid()),
        )

    def ping(self) -> None:
        """The pool needs nothing external."""

    def warm_state(self) -> str:
        """``loading``, ``ready`` or ``failed: reason`` for the engines of the first child."""
        if self._warm is None:
            return "not requested"
        if not self._warm.done():
            return "loading"
        exc = self._warm.exception()
        return "ready" if exc is None else f"failed: {exc}"

    # -- cache ---------------------------------------------------------------------------------------

    def cache_get(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return [self._cache.get(k) for k in keys]

    def pending_get(self, keys: Sequence[str]) -> list[tuple[str, int] | None]:
        with self._lock:
            return [self._pending.get(k) for k in keys]

    def release_pending(self, keys: Sequence[str], job_id: str) -> None:
        with self._lock:
            for k in keys:
                if self._pending.get(k, ("",))[0] == job_id:
                    del self._pending[k]

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(self, payload: JobPayload, keys: Sequence[str], *, interactive: bool) -> tuple[str, list[int]]:
        job_id = uuid.uuid4().hex
        with self._lock:
            taken = [i for i, k in enumerate(keys) if k not in self._pending]
            if not taken:
                return "", []
            kept_keys = [keys[i] for i in taken]
            payload = dataclasses.replace(payload, tasks=[payload.tasks[i] for i in taken])
            for j, key in enumerate(kept_keys):
                self._pending[key] = (job_id, j)
            queue = QUEUE_INTERACTIVE if interactive else QUEUE_BATCH
            future: Future = Future()
            self._jobs[job_id] = _Job(future, kept_keys, queue, json.dumps(payload.to_dict()))
            self._queued[queue].append(job_id)
        future.add_done_callback(lambda f, jid=job_id: self._done(jid))
        self._pump()
        return job_id, taken

    def _pump(self) -> None:
        """Hand queued jobs to the pool while a child is free, interactive ones first."""
        with self._lock:
            while self._running < self.workers:
                queue = next((q for q in (QUEUE_INTERACTIVE, QUEUE_BATCH) if self._queued[q]), None)
                if queue is None or (queue == QUEUE_BATCH and self._running >= self.batch_limit):
                    return
                job = self._jobs.get(self._queued[queue].popleft())
                if job is None or not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                text, job.text = job.text or "", None
                self._running += 1
                try:
                    inner = self._submit(text)
                except Exception as exc:  # the pool cannot start: the job fails with the reason
                    self._running -= 1
                    job.future.set_exception(exc)
                    continue
                inner.add_done_callback(lambda f, j=job: self._ended(j, f))

    def _ended(self, job: _Job, inner: Future) -> None:
        """A child finished ``job``: pass its outcome on and give the free child the next job."""
        with self._lock:
            self._running -= 1
        if inner.cancelled():
            job.future.set_exception(RuntimeError("the job was cancelled: the backend is stopping"))
        elif inner.exception() is not None:
            job.future.set_exception(inner.exception())
        else:
            job.future.set_result(inner.result())
        self._pump()

    def _submit(self, text: str) -> Future:
        from workers.jobs import run_json_timed

        try:
            return self._pool.submit(run_json_timed, text)
        except BrokenProcessPool:
            log.warning("the in-process worker pool broke (a child died); starting a new one")
            _stop_pool(self._pool)
            self._pool = self._new_pool()
            return self._pool.submit(run_json_timed, text)

    def _done(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.ended = time.monotonic()
        results = None
        if not job.future.cancelled() and job.future.exception() is None:
            results = json.loads(job.future.result()[0])
            for key, prediction in zip(job.keys, results, strict=False):
                if isinstance(prediction, dict) and not prediction.get("error"):
                    self._cache.put(result_key(key, str(prediction.get("model_version") or "")), prediction)
        self.release_pending(job.keys, job_id)
        # Keep finished jobs for a while so that waiting requests can read them, then forget them.
        backend = self.settings.backend
        cutoff = time.monotonic() - max(backend.predict_timeout, backend.interactive_timeout) - 60
        with self._lock:
            for jid in [j for j, jb in self._jobs.items() if jb.ended is not None and jb.ended < cutoff]:
                del self._jobs[jid]

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        for job_id in dict.fromkeys(j for j in job_ids if j):
            job = self._jobs.get(job_id)
            if job is None:
                states[job_id] = JobState("failed", error=f"job {job_id} is unknown (expired)")
                continue
            future = job.future
            if not future.done():
                states[job_id] = JobState("pending", detail="running" if future.running() else "queued")
                continue
            latency = (job.ended or time.monotonic()) - job.enqueued
            exc = future.exception()
            if exc is not None:
                reason = "the worker process died" if isinstance(exc, BrokenProcessPool) else str(exc)
                states[job_id] = JobState("failed", error=f"job failed: {reason}", latency=latency)
            else:
                text, seconds = future.result()
                states[job_id] = JobState(
                    "finished", results=json.loads(text), latency=latency, run_seconds=seconds
                )
        return states

    async def wait(self, job_ids: Sequence[str], timeout: float) -> None:
        """Return when one of the jobs' futures is done (its results cached), or after ``timeout`` s."""
        jobs = [self._jobs.get(j) for j in job_ids if j]
        if not jobs or None in jobs or timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake(_: Future) -> None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the waiting loop has closed
                loop.call_soon_threadsafe(lambda: woken.done() or woken.set_result(None))

        for job in jobs:
            job.future.add_done_callback(wake)  # after _done (added at submit): the cache is written
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken, timeout)

    def reap_abandoned(self) -> None:
        """A dead child fails its futures at once (BrokenProcessPool): nothing to reap."""

    def stats(self) -> dict[str, dict[str, int]]:
        out = {q: {"queued": 0, "started": 0, "failed": 0} for q in (QUEUE_INTERACTIVE, QUEUE_BATCH)}
        with self._lock:
            for job in self._jobs.values():
                if job.future.running():
                    out[job.queue]["started"] += 1
                elif not job.future.done():
                    out[job.queue]["queued"] += 1
                elif job.future.exception() is not None:
                    out[job.queue]["failed"] += 1
        return out

    def worker_count(self) -> int:
        return self.workers

    def close(self) -> None:
        """Cancel the queued jobs and stop the children, busy or not (SIGTERM, then SIGKILL)."""
        with self._lock:
            queued = [self._jobs.get(j) for q in self._queued.values() for j in q]
            for queue in self._queued.values():
                queue.clear()
        for job in queued:
            if job is not None:
                job.future.cancel()
        _stop_pool(self._pool)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("in-process worker %s did not stop on SIGTERM: killing it", process.pid)
            process.kill()
            process.join(1.0)
