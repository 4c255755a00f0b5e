"""``groundlabel prelabel``: pre-label a whole Label Studio project, wired to its job runner.

The run itself is :func:`labeling_backend.prelabel.run_prelabel`; this verb reads the settings once,
names the model versions with the workers' naming code, and gives it RQ on Redis (``REDIS_URL``, with
``groundlabel worker`` processes listening) or the workers' in-process runner.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from groundlabel.errors import UserError

if TYPE_CHECKING:
    from groundlabel.protocol import JobRunner
    from groundlabel.settings import Settings


def make_runner(settings: Settings) -> JobRunner:
    """``serve``'s runner (RQ on Redis, or spawned child processes), checked for a listening worker."""
    from groundlabel.protocol import QueueUnavailable
    from groundlabel_cli.serve import make_runner as serve_runner

    runner = serve_runner(settings, warm_up=False)
    if not settings.queue.redis_url:
        return runner
    try:
        runner.ping()
        workers = runner.worker_count()
    except QueueUnavailable as exc:
        runner.close()
        raise UserError(str(exc)) from exc
    if workers == 0:
        runner.close()
        raise UserError(
            f"no worker is listening on the job queues at {runner.where}: start `groundlabel worker` "
            "(or unset REDIS_URL to run the jobs in this process)"
        )
    return runner


def _run(args: argparse.Namespace) -> int:
    from groundlabel.ls_client import (
        get_project,
        iter_tasks,
        make_client,
        resolve_api_key,
        resolve_url,
    )
    from groundlabel.settings import Settings
    from labeling_backend.background import TaskOwners
    from labeling_backend.prelabel import chunked, plan_tasks, run_prelabel
    from labeling_backend.queue import RedisJobQueue
    from workers.engines import all_model_versions, announced_version

    if args.chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the bar
    settings = Settings.from_env()
    url = resolve_url(args.url or settings.fetch.label_studio_url)
    api_key = resolve_api_key(args.api_key or settings.fetch.api_key)
    if not settings.queue.redis_url:
        # The in-process workers fetch the images from this Label Studio, with this key, unless the
        # settings name one already (with its own key).
        if not settings.fetch.label_studio_url:
            settings = settings.with_(label_studio_url=url)
        if not settings.fetch.api_key and settings.fetch.label_studio_url == url:
            settings = settings.with_(api_key=api_key)
    model_version = announced_version(settings)
    versions = tuple(all_model_versions(settings.engines))
    client = make_client(url, api_key)

    if args.dry_run:
        from groundlabel.spec import read_spec

        project = get_project(client, args.project)
        spec = read_spec(project.label_config or "", settings)
        tasks = list(iter_tasks(client, args.project))
        tagged = None if settings.backend.model_version else spec  # as run_prelabel names them
        plan = plan_tasks(
            tasks, args.project, model_version, force=args.force, versions=versions, spec=tagged
        )
        controls = ", ".join(f"{c.name} ({c.type}: {', '.join(c.labels)})" for c in spec.controls)
        print(f"project {args.project}: {plan.total} task(s); controls {controls}")
        print(f"model version {plan.model_version} (predictions named {', '.join(plan.versions)})")
        print(
            f"would predict {len(plan.todo)} task(s) in {len(chunked(plan.todo, args.chunk_size))} chunk(s)"
            f" of up to {args.chunk_size}; would skip {len(plan.skipped)} already predicted"
        )
        for task in plan.todo:
            print(f"  task {task['id']}: {task['data'].get(spec.image_key, '(no image)')}")
        return 0

    runner = make_runner(settings)
    try:
        report = run_prelabel(
            client,
            args.project,
            settings=settings,
            runner=runner,
            model_version=model_version,
            versions=versions,
            label_studio_url=url,
            chunk_size=args.chunk_size,
            force=args.force,
            parallel=args.parallel,
            chunk_timeout=args.timeout,
            owners=TaskOwners(runner.connection) if isinstance(runner, RedisJobQueue) else None,
            progress=not args.no_progress and sys.stderr.isatty() or args.progress,
        )
    finally:
        runner.close()
    for line in report.summary_lines():
        print(line)
    return 1 if report.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prelabel`` verb."""
    p = subparsers.add_parser(
        "prelabel",
        help="pre-label every task of a Label Studio project",
        description=(
            "Predict every task of a Label Studio project that has no prediction of the current model "
            "version, through the job queue (REDIS_URL) or in this process, and import the predictions "
            "into Label Studio chunk by chunk. Re-running resumes; --force re-predicts."
        ),
    )
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--url", default=None, help="Label Studio URL (default: LABEL_STUDIO_URL)")
    p.add_argument(
        "--api-key",
        default=None,
        help="legacy token or personal access token (default: LABEL_STUDIO_API_KEY; prefer the variable: "
        "command lines are visible to other users)",
    )
    p.add_argument("--chunk-size", type=int, default=8, help="tasks per job (default: %(default)s)")
    p.add_argument(
        "--parallel", type=int, default=None, help="chunks in flight at once (default: one per worker)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for one chunk (default: from the job settings)",
    )
    p.add_argument(
        "--force", action="store_true", help="re-predict tasks that already hold a current prediction"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be predicted, change nothing")
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    p.set_defaults(handler=_run)
