"""``groundlabel worker``: an RQ worker (:mod:`workers.worker`) on the prediction or the training queues.

The verb reads the settings once, configures the engines, gives the worker the training job (which
composes the exporters with the workers' fine-tuning, :mod:`groundlabel_cli.training`) and starts it.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("groundlabel.worker")


def _run(args: argparse.Namespace) -> int:
    from groundlabel.errors import UserError
    from groundlabel.redaction import install_log_redaction, redact
    from groundlabel.redis_queue import wait_for_redis
    from groundlabel.settings import Settings
    from groundlabel_cli.training import run_training
    from workers import engines, jobs
    from workers.worker import build_worker

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
    jobs.provide_training(run_training)
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
        log.info("loading engines: %s", jobs.warm_up())
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
