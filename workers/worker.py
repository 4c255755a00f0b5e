"""``groundlabel worker``: an RQ worker that loads the models once and runs prediction jobs.

It listens to ``interactive`` before ``batch``, runs each job in the worker's own process (no fork per
job: the models stay loaded and CUDA is initialised once), and renews the lease of the running job every
``GROUNDLABEL_WORKER_HEARTBEAT`` seconds from one side thread. If the process dies mid-job, the lease runs
out after about three heartbeats and the job is re-queued (while it has retries left) or marked failed
by the next clean-up, which any live worker and any backend waiting for the job perform.
Scale out by starting more workers, on any machine that reaches the same Redis (one per GPU).

**Redis outages.** The worker rides them out: whatever it has to tell Redis (a job starting, its result,
its failure) waits until Redis answers again, retrying every few seconds, and the job's result is
stored then; a worker that Redis forgot (restarted without its data) registers itself again, so the
backend counts it. It never quits because Redis went away.

**Only groundlabel's jobs.** RQ would run any function a job names; this worker runs only the job
functions of :mod:`groundlabel.protocol` (its ``*_FUNCTION`` constants), with callbacks from the
kernel's queue modules only (:data:`CALLBACK_MODULES`). Any other job is marked failed ("refused: ...")
without being run nor retried, so that write access to Redis is not a way to run code on the workers.

**No child process.** RQ forks its scheduler (which moves retries with an interval back onto their queue)
into a child that outlives a SIGKILLed worker and keeps the scheduler lock. Here the scheduler is a thread
of the worker (:func:`_scheduler_class`): it dies with its worker, and its locks live
:data:`SCHEDULER_LOCK_TTL` seconds, renewed every second, so every worker's scheduler thread tries them
each second and one of the live workers takes the scheduler over within that time.

**Two round trips a job.** Past the blocking pop and the read of the job, RQ's worker spends about a
dozen Redis round trips on a job's bookkeeping (heartbeats, the execution record, the started and
finished registries, the result stream, counters), each a wake-up of Redis and of the worker. This one
sends the same writes in two pipelines, one when the job starts and one with its result (which includes
the result cache writes of :func:`groundlabel.redis_queue.store_results`), so the backend sees a finished
job one round trip after the model returns. A job that fails or is refused, or one that uses RQ
features that groundlabel's jobs do not (repeats, rate limits, webhooks, a returned ``Retry``), takes
RQ's own path; no groundlabel job has dependents, so none are looked for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from groundlabel.settings import QueueSettings

log = logging.getLogger("groundlabel.worker")

T = TypeVar("T")

#: The modules whose functions a job may name as its callbacks (prediction jobs, training jobs).
CALLBACK_MODULES = ("groundlabel.redis_queue", "groundlabel.training_queue")


def job_functions() -> frozenset[str]:
    """The dotted paths of the job functions a worker runs: the protocol's ``*_FUNCTION`` constants."""
    from groundlabel import protocol

    return frozenset(
        value
        for name, value in vars(protocol).items()
        if name.endswith("_FUNCTION") and isinstance(value, str)
    )


def refusal(job: Any) -> str | None:
    """Why the worker must not run ``job`` (a function or callback that is not groundlabel's), or None."""
    allowed = job_functions()
    if job.func_name not in allowed or job.instance is not None:
        return f"job function {job.func_name!r} is not one of groundlabel's ({', '.join(sorted(allowed))})"
    for kind in ("success", "failure", "stopped"):
        name = getattr(job, f"_{kind}_callback_name", None)
        if name and name.rpartition(".")[0] not in CALLBACK_MODULES:
            return f"{kind} callback {name!r} is not one of {' or '.join(CALLBACK_MODULES)}'s"
    return None


#: The live workers of this process, whose Redis sockets a forked child closes (:func:`_close_inherited`).
_WORKERS: weakref.WeakSet = weakref.WeakSet()


def _close_inherited() -> None:
    """In a forked child (a training job's data loader): close the Redis sockets inherited from the
    worker. Otherwise, after the worker is killed while it waits in its blocking dequeue, the child keeps
    that connection open and Redis hands the next job to it, where nobody reads it: the job is lost."""
    for worker in list(_WORKERS):
        with contextlib.suppress(Exception):
            pool = worker.connection.connection_pool
            inherited = [
                *getattr(pool, "_available_connections", ()),
                *getattr(pool, "_in_use_connections", ()),
            ]
            pubsub = getattr(worker, "pubsub", None)
            if pubsub is not None and pubsub.connection is not None:
                inherited.append(pubsub.connection)
            for connection in inherited:
                connection.disconnect()  # in a child: closes this process's copy of the socket only
            pool.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


#: Seconds a scheduler lock outlives its last renewal: a killed worker's scheduler is replaced within it.
SCHEDULER_LOCK_TTL = 10


def _scheduler_class() -> type:
    from rq.scheduler import RQScheduler
    from rq.scripts import acquire_or_refresh_lock
    from rq.utils import now, utcformat

    class ThreadScheduler(RQScheduler):
        """RQ's scheduler on a daemon thread of the worker instead of a forked child.

        Every ``interval`` seconds it takes or renews the scheduler lock of each of its queues (held
        :data:`SCHEDULER_LOCK_TTL` seconds) and moves the due jobs of the queues it holds onto them. It
        runs whether it holds a lock or not, so when the worker holding them is killed, another live
        worker's scheduler takes them over as soon as they expire, busy or not.
        """

        lock_ttl = SCHEDULER_LOCK_TTL

        def acquire_locks(self, auto_start: bool = False) -> set[str]:
            held = {name for name in self._queue_names if self._hold(name)}
            if held - self._acquired_locks:
                log.info("scheduler %s took the scheduler of %s", self.name, ", ".join(sorted(held)))
            if held != self._acquired_locks:
                self._scheduled_job_registries = []
            self._acquired_locks = held
            self.lock_acquisition_time = now()
            if held and auto_start and not (self._process and self._process.is_alive()):
                self.start()
            return held

        def _hold(self, queue: str) -> bool:
            """Take or renew the scheduler lock of ``queue``; whether this scheduler holds it now."""
            key = self.get_locking_key(queue)
            return acquire_or_refresh_lock(self.connection, key, self.name, self.lock_ttl) != "taken"

        def heartbeat(self) -> None:
            self.last_heartbeat = now()
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, "last_heartbeat", utcformat(self.last_heartbeat))
                pipe.expire(self.key, self.lock_ttl)
                pipe.execute()

        def save(self, pipeline: Any = None) -> None:
            connection = pipeline if pipeline is not None else self.connection.pipeline()
            connection.hset(self.key, mapping=self.to_dict())
            connection.expire(self.key, self.lock_ttl)
            if pipeline is None:
                connection.execute()

        def start(self) -> threading.Thread:
            self._stop_requested = False
            self._process = threading.Thread(target=self._run, name="scheduler", daemon=True)
            self._process.start()
            return self._process

        def request_stop(self, signum: Any = None, frame: Any = None) -> None:
            self._stop_requested = True

        def _run(self) -> None:
            registered = False
            while not self._stop_requested:
                try:
                    if not registered:
                        self.register_birth()
                        registered = True
                    self.acquire_locks()
                    self.heartbeat()
                    if self._acquired_locks:
                        self.enqueue_scheduled_jobs()
                except Exception as exc:  # Redis away: try again on the next tick
                    log.warning("scheduler tick failed: %s", exc)
                    registered = False
                time.sleep(self.interval)
            with contextlib.suppress(Exception):
                self.stop()  # releases its locks at once, for a clean stop

    return ThreadScheduler


def _worker_class() -> type:
    import redis
    from rq import Retry, worker_registration
    from rq.callbacks import execute_success_callback
    from rq.executions import Execution
    from rq.job import JobStatus
    from rq.timeouts import JobTimeoutException
    from rq.utils import now
    from rq.worker import SimpleWorker, WorkerStatus

    from groundlabel.redis_queue import PIPELINED_CALLBACKS

    redis_down = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    class GroundlabelWorker(SimpleWorker):
        """A SimpleWorker with a short, renewed job lease, that outlives Redis outages, refuses jobs
        that are not groundlabel's, and does a job's bookkeeping in two Redis round trips (one to
        start it, one to store its result) instead of RQ's dozen."""

        lease_interval: float = 5.0
        #: The longest wait between two attempts to reach Redis when it is away.
        max_connection_wait_time: float = 5.0
        _registered = False
        _lease: tuple[Any, Any] | None = None  # (job, execution) whose lease the side thread renews
        _lease_lock: threading.Lock | None = None
        _default_beat = 0.0  # time.monotonic() of the last renewal with the default TTL

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return int(math.ceil(3 * self.lease_interval)) + 1

        # -- Redis outages -------------------------------------------------------------------------

        def until_redis_answers(self, step: Callable[[], T], what: str) -> T:
            """``step()``, retried while Redis is unreachable (every 0.5 s, then up to every 5 s)."""
            wait, warned = 0.5, False
            while True:
                try:
                    result = step()
                except redis_down as exc:
                    if not warned:
                        log.warning("Redis is away while %s (%s); waiting for it to come back", what, exc)
                        warned = True
                    time.sleep(wait)
                    wait = min(wait * 2, self.max_connection_wait_time)
                    continue
                if warned:
                    log.info("Redis is back: %s done", what)
                return result

        def register_birth(self) -> None:
            super().register_birth()
            self._registered = True
            _WORKERS.add(self)

        def register_death(self) -> None:
            self._registered = False
            super().register_death()

        def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
            """RQ's heartbeat in one round trip with the registration check; skipped when the same
            renewal was made less than a second ago (RQ renews right before and right after a dequeue
            and a job, so each busy dequeue would pay up to three)."""
            default = timeout is None or timeout == self.worker_ttl + 60
            if pipeline is not None:
                super().heartbeat(timeout, pipeline)
                self._default_beat = time.monotonic() if default else 0.0
                return
            if default and time.monotonic() - self._default_beat < 1.0:
                return
            with self.connection.pipeline() as pipe:
                super().heartbeat(timeout, pipe)
                pipe.sismember(worker_registration.REDIS_WORKER_KEYS, self.key)
                registered = pipe.execute()[-1]
            self._default_beat = time.monotonic() if default else 0.0
            if self._registered and not registered:
                self._register_again()

        def _register_again(self) -> None:
            log.warning("Redis lost this worker's registration (restarted empty?): registering again")
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()

        def set_state(self, state: str, pipeline: Any = None) -> None:
            if pipeline is not None:
                super().set_state(state, pipeline)
                return
            if state == self._state:  # already recorded (the job's last round trip sets it idle)
                return
            try:
                super().set_state(state)
            except redis_down as exc:  # the state is advisory; the dequeue loop waits for Redis
                log.warning("cannot record state %s: Redis is away (%s)", state, exc)

        def check_for_suspension(self, burst: bool) -> None:
            with contextlib.suppress(*redis_down):  # the dequeue loop waits for Redis
                super().check_for_suspension(burst)

        def run_maintenance_tasks(self) -> None:
            try:
                super().run_maintenance_tasks()
            except redis_down as exc:
                log.warning("clean-up skipped: Redis is away (%s)", exc)

        # -- the scheduler (a thread, never a child process) ------------------------------------------

        def _start_scheduler(
            self,
            burst: bool = False,
            logging_level: str | None = "INFO",
            date_format: str = "",
            log_format: str = "",
        ) -> None:
            scheduler_class = _scheduler_class()
            self.scheduler = scheduler_class(
                self.queues,
                connection=self.connection,
                logging_level=logging_level or "INFO",
                serializer=self.serializer,
                name=f"{self.name}-scheduler",
            )
            if not burst:
                self.scheduler.start()
                return
            if self.scheduler.acquire_locks():  # burst: move what is due once, then let go
                try:
                    self.scheduler.enqueue_scheduled_jobs()
                finally:
                    self.scheduler.release_locks()

        def stop_scheduler(self) -> None:
            if self.scheduler is None:
                return
            self.scheduler.request_stop()
            thread = self.scheduler._process
            if thread is not None and thread is not threading.current_thread():
                thread.join(5)

        # -- the lease -------------------------------------------------------------------------------

        def _hold_lease(self, job: Any, execution: Any) -> None:
            """Have the side thread renew ``job``'s lease (the thread is started once, on the first job)."""
            if self._lease_lock is None:
                self._lease_lock = threading.Lock()
                threading.Thread(target=self._renew_leases, name="lease", daemon=True).start()
            with self._lease_lock:
                self._lease = (job, execution)

        def _renew_leases(self) -> None:
            assert self._lease_lock is not None
            while True:
                time.sleep(self.lease_interval)
                with self._lease_lock:
                    if self._lease is None:
                        continue
                    job, execution = self._lease
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception as exc:  # Redis hiccup: the next beat tries again
                        log.warning("heartbeat for job %s failed: %s", job.id, exc)

        def _release_lease(self, step: Callable[[], T]) -> T:
            """``step()`` (the job's last writes), then no more lease renewals; never both at once."""
            assert self._lease_lock is not None
            with self._lease_lock:
                result = step()
                self._lease = None
            return result

        # -- one job ----------------------------------------------------------------------------------

        def execute_job(self, job: Any, queue: Any) -> None:
            reason = refusal(job)
            if reason is not None:
                self._refuse(job, queue, reason)
                return
            execution = self.until_redis_answers(lambda: self._start(job), f"starting job {job.id}")
            self._hold_lease(job, execution)
            try:
                self.perform_job(job, queue, execution)
            finally:
                with self._lease_lock or contextlib.nullcontext():
                    self._lease = None
                self.set_state(WorkerStatus.IDLE)

        def _refuse(self, job: Any, queue: Any, reason: str) -> None:
            """Mark a job that is not groundlabel's failed, without running nor retrying it."""
            log.error("refused job %s: %s", job.id, reason)
            execution = self.until_redis_answers(
                lambda: self.prepare_execution(job), f"refusing job {job.id}"
            )
            job.retries_left = 0
            job.ended_at = now()
            self.until_redis_answers(
                lambda: self.handle_job_failure(
                    job, queue, exc_string=f"refused: {reason}", execution=execution
                ),
                f"refusing job {job.id}",
            )
            self.set_state(WorkerStatus.IDLE)

        def _start(self, job: Any) -> Any:
            """RQ's heartbeat after a dequeue, prepare_execution and prepare_job_execution, in one round
            trip: the worker is busy, the job started, its execution in the started registry (its lease)."""
            ttl = self.get_heartbeat_ttl(job)
            with self.connection.pipeline() as pipe:
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                self.heartbeat(ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                if len(self.queues) == 1:  # RQ moves the job id through an intermediate list then
                    pipe.lrem(self.queues[0].intermediate_queue_key, 1, job.id)
                pipe.sismember(worker_registration.REDIS_WORKER_KEYS, self.key)
                registered = pipe.execute()[-1]
            self.executions[execution.id] = execution
            if self._registered and not registered:
                self._register_again()
            return execution

        def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
            """RQ's perform_job, with the job's result stored in one round trip and Redis outages
            waited out."""
            job.started_at = now()
            try:
                with self.death_penalty_class(
                    job.timeout or self.queue_class.DEFAULT_TIMEOUT, JobTimeoutException, job_id=job.id
                ):
                    value = job.perform()
                self._release_lease(
                    lambda: self.until_redis_answers(
                        lambda: self._store_success(job, queue, execution, value),
                        f"storing job {job.id}'s result",
                    )
                )
                return True
            except Exception:
                exc_info = sys.exc_info()
                self._release_lease(
                    lambda: self.until_redis_answers(
                        lambda: self._finalize_failure(job, queue, execution, exc_info),
                        f"recording job {job.id}'s failure",
                    )
                )
                return False

        def _store_success(self, job: Any, queue: Any, execution: Any, value: Any) -> None:
            """RQ's _finalize_success (success callback, result, registries, counters, the worker
            idle again) in one round trip, without RQ's look for dependents (groundlabel enqueues none).
            A job with repeats, a rate limit or webhooks, or that returns a Retry, takes RQ's own path."""
            if isinstance(value, Retry) or any(
                getattr(job, name, None) for name in ("repeats_left", "has_rate_limit", "webhooks")
            ):
                self._finalize_success(job, queue, execution, value)
                return
            job.ended_at = now()
            job.last_heartbeat = job.ended_at
            job._result = value
            job._status = JobStatus.FINISHED
            add_writes = PIPELINED_CALLBACKS.get(job._success_callback_name or "")
            if add_writes is None and job.success_callback is not None:
                execute_success_callback(job, self.death_penalty_class, value)
            result_ttl = job.get_result_ttl(self.default_result_ttl)
            with self.connection.pipeline() as pipe:
                if add_writes is not None:
                    add_writes(job, pipe, value)
                self.increment_successful_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - job.started_at, pipe)
                if result_ttl != 0:
                    job._handle_success(
                        result_ttl,
                        pipeline=pipe,
                        worker_name=self.name,
                        execution_id=execution.id,
                        execution_started_at=execution.created_at,
                        execution_ended_at=job.ended_at,
                    )
                job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                self.set_state(WorkerStatus.IDLE, pipeline=pipe)
                self.heartbeat(pipeline=pipe)  # the one RQ's loop sends after the job
                pipe.execute()
            log.debug("job %s finished in %s", job.id, job.ended_at - job.started_at)

    return GroundlabelWorker


def build_worker(
    settings: QueueSettings,
    *,
    queues: list[str] | None = None,
    name: str | None = None,
    heartbeat: float = 5.0,
    maintenance_interval: int = 30,
    train_timeout: int = 6 * 3600,
) -> Any:
    """A worker on ``queues`` (default: interactive, then batch; ``train`` for training jobs) of the Redis
    at ``settings.redis_url``, with the JSON serializer."""
    from rq.serializers import JSONSerializer

    from groundlabel.protocol import QUEUE_NAMES, QUEUE_TRAIN
    from groundlabel.redis_queue import connect, make_queues
    from groundlabel.training_queue import train_queue

    connection = connect(settings.redis_url or "", timeout=settings.redis_timeout)
    all_queues = make_queues(connection, settings)
    all_queues[QUEUE_TRAIN] = train_queue(connection, train_timeout)
    names = queues or list(QUEUE_NAMES)
    unknown = [q for q in names if q not in all_queues]
    if unknown:
        from groundlabel.errors import UserError

        raise UserError(f"unknown queue(s) {', '.join(unknown)}; the queues are {', '.join(all_queues)}")
    cls = _worker_class()
    cls.lease_interval = heartbeat
    return cls(
        [all_queues[q] for q in names],
        name=name,
        connection=connection,
        serializer=JSONSerializer,
        maintenance_interval=maintenance_interval,
        job_monitoring_interval=max(1, int(heartbeat)),
        worker_ttl=max(30, int(6 * heartbeat)),
    )
