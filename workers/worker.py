"""``groundlabel worker``: an RQ worker that loads the models once and runs prediction jobs.

It listens to ``interactive`` before ``batch``, runs each job in its own process (no fork per job: the
models stay loaded and CUDA is initialised once), and renews the lease of the running job every
``GROUNDLABEL_WORKER_HEARTBEAT`` seconds from a side thread. If the process dies mid-job, the lease runs
out after about three heartbeats and the job is re-queued (while it has retries left) or marked failed
by the next clean-up, which any live worker and any backend waiting for the job perform.
Scale out by starting more workers, on any machine that reaches the same Redis (one per GPU).
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from groundlabel.settings import QueueSettings

log = logging.getLogger("groundlabel.worker")


def _worker_class() -> type:
    from rq.worker import SimpleWorker

    class GroundlabelWorker(SimpleWorker):
        """A SimpleWorker whose job lease is short and renewed by a heartbeat thread."""

        lease_interval: float = 5.0

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return int(math.ceil(3 * self.lease_interval)) + 1

        def execute_job(self, job: Any, queue: Any) -> None:
            from rq.worker import WorkerStatus

            execution = self.prepare_execution(job)
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

    return GroundlabelWorker


def build_worker(
    settings: QueueSettings,
    *,
    queues: list[str] | None = None,
    name: str | None = None,
    heartbeat: float = 5.0,
    maintenance_interval: int = 30,
) -> Any:
    """A worker on ``queues`` (default: interactive, then batch) of the Redis at ``settings.redis_url``,
    with the JSON serializer."""
    from rq.serializers import JSONSerializer

    from groundlabel.protocol import QUEUE_NAMES
    from groundlabel.redis_queue import connect, make_queues

    connection = connect(settings.redis_url or "", timeout=settings.redis_timeout)
    all_queues = make_queues(connection, settings)
    names = queues or list(QUEUE_NAMES)
    unknown = [q for q in names if q not in all_queues]
    if unknown:
        from groundlabel.errors import UserError

        raise UserError(f"unknown queue(s) {', '.join(unknown)}; the queues are {', '.join(QUEUE_NAMES)}")
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
    )
    if not wait_for_redis(worker.connection, 30):
        raise UserError(f"Redis at {redact(redis_url)} does not answer (waited 30 s)")
    if not args.no_preload:
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
            "Run prediction jobs from the 'interactive' then the 'batch' queue. The models are configured "
            "by GROUNDLABEL_GEM_* / GROUNDLABEL_LAVT_* environment variables (see docs/backend.md)."
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
