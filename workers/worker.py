"""``groundlabel worker``: an RQ worker that loads the models once and runs prediction jobs.

It listens to ``interactive`` before ``batch``, runs each job in its own process (no fork per job: the
models stay loaded and CUDA is initialised once), and renews the lease of the running job every
``GROUNDLABEL_WORKER_HEARTBEAT`` seconds from a side thread. If the process dies mid-job, the lease runs
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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import threading
import time
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


def _worker_class() -> type:
    import redis
    from rq import worker_registration
    from rq.timeouts import JobTimeoutException
    from rq.utils import now
    from rq.worker import SimpleWorker, WorkerStatus

    redis_down = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    class GroundlabelWorker(SimpleWorker):
        """A SimpleWorker with a short, renewed job lease, that outlives Redis outages and refuses
        jobs that are not groundlabel's."""

        lease_interval: float = 5.0
        #: The longest wait between two attempts to reach Redis when it is away.
        max_connection_wait_time: float = 5.0
        _registered = False

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

        def register_death(self) -> None:
            self._registered = False
            super().register_death()

        def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
            super().heartbeat(timeout, pipeline)
            if pipeline is None and self._registered:
                self._register_again_if_forgotten()

        def _register_again_if_forgotten(self) -> None:
            if self.connection.sismember(worker_registration.REDIS_WORKER_KEYS, self.key):
                return
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

        # -- one job ----------------------------------------------------------------------------------

        def execute_job(self, job: Any, queue: Any) -> None:
            execution = self.until_redis_answers(
                lambda: self.prepare_execution(job), f"starting job {job.id}"
            )
            stop = threading.Event()

            def beat() -> None:
                while not stop.wait(self.lease_interval):
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception as exc:  # Redis hiccup: the next beat tries again
                        log.warning("heartbeat for job %s failed: %s", job.id, exc)

            thread = threading.Thread(target=beat, name=f"lease-{job.id[:8]}", daemon=True)
            thread.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                stop.set()
                thread.join(timeout=self.lease_interval + 1)
                self.set_state(WorkerStatus.IDLE)

        def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
            """RQ's perform_job, except that a foreign job is refused and Redis outages are waited out."""
            reason = refusal(job)
            if reason is not None:
                log.error("refused job %s: %s", job.id, reason)
                job.retries_left = 0
                job.ended_at = now()
                self.until_redis_answers(
                    lambda: self.handle_job_failure(
                        job, queue, exc_string=f"refused: {reason}", execution=execution
                    ),
                    f"refusing job {job.id}",
                )
                return False
            self.until_redis_answers(
                lambda: self.prepare_job_execution(job, len(self.queues) == 1), f"starting job {job.id}"
            )
            job.started_at = now()
            try:
                with self.death_penalty_class(
                    job.timeout or self.queue_class.DEFAULT_TIMEOUT, JobTimeoutException, job_id=job.id
                ):
                    value = job.perform()
                self.until_redis_answers(
                    lambda: self._finalize_success(job, queue, execution, value),
                    f"storing job {job.id}'s result",
                )
                return True
            except Exception:
                exc_info = sys.exc_info()
                self.until_redis_answers(
                    lambda: self._finalize_failure(job, queue, execution, exc_info),
                    f"recording job {job.id}'s failure",
                )
                return False

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


def _run(args: argparse.Namespace) -> int:
    from groundlabel.errors import UserError
    from groundlabel.redaction import install_log_redaction, redact
    from groundlabel.redis_queue import wait_for_redis
    from groundlabel.settings import Settings
    from workers import engines

    settings = Settings.from_env()
    if args.redis_url:
        settings = settings.with_(redis_url=args.redis_url)
    redis_url = settings.queue.redis_url
    if not redis_url:
        raise UserError("the worker needs a Redis: set REDIS_URL or pass --redis-url")
    if args.log_level:
        logging.getLogger().setLevel(args.log_level.upper())
    install_log_redaction(settings.secrets())
    engines.configure(settings)
    heartbeat = args.heartbeat or settings.queue.worker_heartbeat
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    worker = build_worker(
        settings.queue,
        queues=queues,
        name=args.name,
        heartbeat=heartbeat,
        maintenance_interval=args.maintenance_interval,
        train_timeout=settings.training.timeout,
    )
    if not wait_for_redis(worker.connection, 30):
        raise UserError(f"Redis at {redact(redis_url)} does not answer (waited 30 s)")
    if not args.no_preload and set(queues) - {"train"}:  # a training worker loads its models per job
        from workers.jobs import warm_up

        log.info("loading engines: %s", warm_up())
    worker.work(
        burst=args.burst,
        max_jobs=args.max_jobs,
        with_scheduler=True,
        logging_level=(args.log_level or "INFO").upper(),
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``worker`` verb."""
    p = subparsers.add_parser(
        "worker",
        help="run a prediction worker on the Redis queues (loads GEM/LAVT once)",
        description=(
            "Run prediction jobs from the 'interactive' then the 'batch' queue, or training jobs with "
            "--queues train (docs/training.md). The models are configured by GROUNDLABEL_GEM_* / "
            "GROUNDLABEL_LAVT_* environment variables (see docs/backend.md)."
        ),
    )
    p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL)")
    p.add_argument(
        "--queues", default="interactive,batch", help="queues in priority order (default: %(default)s)"
    )
    p.add_argument("--name", help="worker name (default: host and pid)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    p.add_argument(
        "--heartbeat",
        type=float,
        help="seconds between job-lease renewals (default: GROUNDLABEL_WORKER_HEARTBEAT or 5)",
    )
    p.add_argument(
        "--maintenance-interval",
        type=int,
        default=30,
        help="seconds between clean-ups of abandoned jobs (default: %(default)s)",
    )
    p.add_argument("--no-preload", action="store_true", help="load the models on the first job, not at start")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.set_defaults(handler=_run)
