"""``groundlabel prelabel``: pre-label a whole Label Studio project outside the request path.

Label Studio's own "Retrieve predictions" action sends every selected task in one synchronous
``/predict`` call with a 100 s budget; a large project does not fit. This command instead:

1. reads the project's label config (the same :func:`parse_label_config` as the backend);
2. lists the project's tasks and skips those that already hold a prediction whose ``model_version`` is
   the one groundlabel writes now (``--force`` re-predicts them): a re-run resumes where the last stopped;
3. sends the others in chunks of ``--chunk-size`` tasks through the backend's own job code: RQ jobs on the
   ``batch`` queue when ``REDIS_URL`` is set (``groundlabel worker`` processes run them), otherwise
   spawned child processes, as ``groundlabel serve`` does;
4. imports each chunk's predictions into Label Studio as soon as the chunk is done
   (``POST /api/projects/{id}/import/predictions``), with a progress bar, then prints a summary.

Tasks that fail get no prediction (a re-run tries them again); the summary lists their reasons.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from groundlabel.errors import UserError

log = logging.getLogger("groundlabel.prelabel")


@dataclass
class PrelabelPlan:
    """What a run will do: the tasks to predict and the tasks it skips."""

    project_id: int
    model_version: str
    todo: list[dict[str, Any]]
    skipped: list[int]  # ids of tasks already predicted with ``model_version``
    total: int


@dataclass
class PrelabelReport:
    """What a run did."""

    plan: PrelabelPlan
    done: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)  # done, but no region was found
    failed: dict[int, str] = field(default_factory=dict)  # task id -> reason

    def summary_lines(self, max_failures: int = 20) -> list[str]:
        """A short human summary."""
        plan = self.plan
        lines = [
            f"project {plan.project_id}, model version {plan.model_version}: {plan.total} task(s)",
            f"  done:    {len(self.done)}"
            + (f" ({len(self.empty)} with no region found)" if self.empty else ""),
            f"  skipped: {len(plan.skipped)} (already predicted by {plan.model_version})",
            f"  failed:  {len(self.failed)}",
        ]
        if self.failed:
            reasons = Counter(self.failed.values())
            for reason, count in reasons.most_common(max_failures):
                ids = [str(t) for t, r in self.failed.items() if r == reason][:5]
                more = ", ..." if count > len(ids) else ""
                lines.append(f"    {count} task(s) ({', '.join(ids)}{more}): {reason}")
            if len(reasons) > max_failures:
                lines.append(f"    ... and {len(reasons) - max_failures} other reason(s)")
            lines.append("  failed tasks get no prediction: run the command again to retry them")
        return lines


def plan_tasks(
    tasks: Sequence[dict[str, Any]], project_id: int, model_version: str, *, force: bool = False
) -> PrelabelPlan:
    """Split a project's tasks into those to predict and those that already hold a current prediction."""
    from groundlabel.ls_client import has_prediction_version

    todo: list[dict[str, Any]] = []
    skipped: list[int] = []
    for task in tasks:
        if not force and has_prediction_version(task, model_version):
            skipped.append(int(task["id"]))
        else:
            todo.append({"id": int(task["id"]), "data": task.get("data") or {}})
    return PrelabelPlan(project_id, model_version, todo, skipped, len(tasks))


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive slices of ``size`` items."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def make_runner(settings: Any) -> Any:
    """The job runner ``groundlabel serve`` would use: RQ on Redis, or spawned child processes."""
    if settings.redis_url:
        from labeling_backend.queue import QueueUnavailable, RedisJobQueue

        runner = RedisJobQueue(settings)
        try:
            runner.ping()
            workers = runner.worker_count()
        except QueueUnavailable as exc:
            raise UserError(str(exc)) from exc
        if workers == 0:
            runner.close()
            raise UserError(
                f"no worker is listening on the job queues at {runner.where}: start `groundlabel worker` "
                "(or unset REDIS_URL to run the jobs in this process)"
            )
        return runner
    from labeling_backend.inprocess import InProcessRunner

    return InProcessRunner(settings, warm_up=False)


def run_prelabel(
    client: Any,
    project_id: int,
    *,
    settings: Any,
    label_studio_url: str | None = None,
    chunk_size: int = 8,
    force: bool = False,
    parallel: int | None = None,
    chunk_timeout: float | None = None,
    progress: bool = True,
    runner: Any = None,
) -> PrelabelReport:
    """Predict every task of ``project_id`` that lacks a current prediction and push the results.

    ``settings`` is a :class:`labeling_backend.settings.Settings`; ``runner`` replaces the job runner
    built from it. Chunks run ``parallel`` at a time (default: one per worker).
    """
    from tqdm import tqdm

    from groundlabel.ls_client import get_project, iter_tasks
    from labeling_backend.label_config import parse_label_config
    from labeling_backend.metrics import Metrics
    from labeling_backend.service import Predictor

    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    project = get_project(client, project_id)
    spec = parse_label_config(project.label_config or "")
    tasks = list(iter_tasks(client, project_id))
    plan = plan_tasks(tasks, project_id, settings.model_version, force=force)
    report = PrelabelReport(plan)
    if not plan.todo:
        return report

    own_runner = runner is None
    runner = runner or make_runner(settings)
    try:
        job_settings = settings.with_(chunk_size=chunk_size)
        predictor = Predictor(job_settings, runner, Metrics(runner.stats))
        if chunk_timeout is None:
            retries = settings.job_retries + 1
            chunk_timeout = settings.job_timeout * retries + sum(settings.retry_intervals) + 60
        if parallel is None:
            parallel = max(1, runner.worker_count() if settings.redis_url else settings.workers_inprocess)
        chunks = chunked(plan.todo, chunk_size)
        bar = tqdm(total=len(plan.todo), unit="task", desc=f"project {project_id}", disable=not progress)

        def predict_chunk(chunk: list[dict[str, Any]]) -> Any:
            return predictor.predict(chunk, spec, label_studio_url=label_studio_url, timeout=chunk_timeout)

        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="prelabel") as pool:
            pending: dict[Future, list[dict[str, Any]]] = {}
            queue = list(chunks)
            while queue or pending:
                while queue and len(pending) < parallel:
                    chunk = queue.pop(0)
                    pending[pool.submit(predict_chunk, chunk)] = chunk
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    chunk = pending.pop(future)
                    _collect(client, project_id, plan.model_version, chunk, future, report, replace=force)
                    bar.update(len(chunk))
                    bar.set_postfix(done=len(report.done), failed=len(report.failed))
        bar.close()
    finally:
        if own_runner:
            runner.close()
    return report


def _collect(
    client: Any,
    project_id: int,
    model_version: str,
    chunk: list[dict[str, Any]],
    future: Future,
    report: PrelabelReport,
    *,
    replace: bool = False,
) -> None:
    """Record one finished chunk and import its predictions.

    ``replace``: the tasks' older predictions of the same model version are deleted once the new ones
    are stored (``--force``), so a task keeps one prediction per model version.
    """
    from groundlabel.ls_client import (
        LabelStudioError,
        delete_predictions,
        prediction_ids,
        push_predictions,
    )

    try:
        outcome = future.result()
    except UserError as exc:
        for task in chunk:
            report.failed[task["id"]] = str(exc)
        return
    except Exception as exc:  # a broken runner must not lose the other chunks
        log.exception("chunk of %d task(s) failed", len(chunk))
        for task in chunk:
            report.failed[task["id"]] = f"{type(exc).__name__}: {exc}"
        return
    predictions = []
    for answer in outcome.answers:
        if answer.prediction is None:
            report.failed[answer.task_id] = answer.error or "no prediction"
            continue
        predictions.append(
            {
                "task": answer.task_id,
                "result": answer.prediction.get("result") or [],
                "score": answer.prediction.get("score"),
                "model_version": model_version,
            }
        )
    try:
        old: list[int] = []
        if replace:
            for p in predictions:
                old.extend(prediction_ids(client, p["task"], model_version))
        push_predictions(client, project_id, predictions)
        delete_predictions(client, old)
    except LabelStudioError as exc:
        for p in predictions:
            report.failed[p["task"]] = str(exc)
        return
    for p in predictions:
        report.done.append(p["task"])
        if not p["result"]:
            report.empty.append(p["task"])


def _run(args: argparse.Namespace) -> int:
    from groundlabel.ls_client import (
        get_project,
        iter_tasks,
        make_client,
        resolve_api_key,
        resolve_url,
    )
    from labeling_backend.settings import Settings

    if args.chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the bar
    url = resolve_url(args.url)
    api_key = resolve_api_key(args.api_key)
    settings = Settings.from_env()
    if not settings.redis_url:
        # The child processes that run the jobs read Label Studio's address and key from the environment.
        if not os.environ.get("LABEL_STUDIO_URL"):
            os.environ["LABEL_STUDIO_URL"] = url
        if not os.environ.get("LABEL_STUDIO_API_KEY") and (
            os.environ.get("LABEL_STUDIO_URL", "").rstrip("/") == url
        ):
            os.environ["LABEL_STUDIO_API_KEY"] = api_key
    client = make_client(url, api_key)

    if args.dry_run:
        from labeling_backend.label_config import parse_label_config

        project = get_project(client, args.project)
        spec = parse_label_config(project.label_config or "")
        plan = plan_tasks(
            list(iter_tasks(client, args.project)), args.project, settings.model_version, force=args.force
        )
        controls = ", ".join(f"{c.name} ({c.type}: {', '.join(c.labels)})" for c in spec.controls)
        print(f"project {args.project}: {plan.total} task(s); controls {controls}")
        print(f"model version {plan.model_version}")
        print(
            f"would predict {len(plan.todo)} task(s) in {len(chunked(plan.todo, args.chunk_size))} chunk(s)"
            f" of up to {args.chunk_size}; would skip {len(plan.skipped)} already predicted"
        )
        for task in plan.todo:
            print(f"  task {task['id']}: {task['data'].get(spec.image_key, '(no image)')}")
        return 0

    report = run_prelabel(
        client,
        args.project,
        settings=settings,
        label_studio_url=url,
        chunk_size=args.chunk_size,
        force=args.force,
        parallel=args.parallel,
        chunk_timeout=args.timeout,
        progress=not args.no_progress and sys.stderr.isatty() or args.progress,
    )
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
