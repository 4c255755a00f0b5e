"""``groundlabel prelabel``: pre-label a whole Label Studio project outside the request path.

Label Studio's own "Retrieve predictions" action sends every selected task in one synchronous
``/predict`` call with a 100 s budget; a large project does not fit. This command instead:

1. reads the project's label config with the backend's reader (:func:`groundlabel.spec.read_spec`, with the
   same settings' defaults, so it names the model version as ``serve`` does);
2. lists the project's tasks and skips those that already hold a prediction whose ``model_version`` is
   one of those groundlabel's configured engines write now (``--force`` re-predicts them): a re-run
   resumes where the last stopped;
3. sends the others in chunks of ``--chunk-size`` tasks through the backend's own dispatching, on the job
   runner it is given (``groundlabel prelabel`` passes RQ jobs on the ``batch`` queue when ``REDIS_URL``
   is set, otherwise spawned child processes, as ``groundlabel serve`` does);
4. imports each chunk's predictions into Label Studio as soon as the chunk is done
   (``POST /api/projects/{id}/import/predictions``), with a progress bar, then prints a summary.

With Redis, each chunk claims its tasks first (:class:`labeling_backend.background.TaskOwners`): a task
that a backend's background run is writing is left to it, and the backend leaves this run's tasks alone,
so no task gets two predictions of one version.

Tasks that fail get no prediction (a re-run tries them again); the summary lists their reasons.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from groundlabel.errors import UserError
from groundlabel.protocol import JobRunner
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec
from groundlabel.versions import versioned
from labeling_backend.background import TaskOwners

log = logging.getLogger("groundlabel.prelabel")


@dataclass
class PrelabelPlan:
    """What a run will do: the tasks to predict and the tasks it skips."""

    project_id: int
    model_version: str  # the announced version
    todo: list[dict[str, Any]]
    skipped: list[int]  # ids of tasks already predicted with one of ``versions``
    total: int
    versions: tuple[str, ...] = ()  # every name the configured engines give their predictions


@dataclass
class PrelabelReport:
    """What a run did."""

    plan: PrelabelPlan
    done: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)  # done, but no region was found
    failed: dict[int, str] = field(default_factory=dict)  # task id -> reason
    busy: list[int] = field(default_factory=list)  # left to a backend's background run writing them

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
        if self.busy:
            lines.append(f"  left to the backend's background run writing them: {len(self.busy)}")
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
    tasks: Sequence[dict[str, Any]],
    project_id: int,
    model_version: str,
    *,
    force: bool = False,
    versions: Sequence[str] = (),
    spec: LabelingSpec | None = None,
) -> PrelabelPlan:
    """Split a project's tasks into those to predict and those that already hold a current prediction
    (of ``model_version`` or of one of ``versions``, the names the configured engines write, each
    followed by ``spec``'s tag when a spec is given: :func:`groundlabel.versions.versioned`)."""
    from groundlabel.ls_client import has_prediction_version

    current = tuple(dict.fromkeys([model_version, *versions]))
    if spec is not None:
        current = tuple(versioned(v, spec) for v in current)
        model_version = versioned(model_version, spec)
    todo: list[dict[str, Any]] = []
    skipped: list[int] = []
    for task in tasks:
        if not force and any(has_prediction_version(task, v) for v in current):
            skipped.append(int(task["id"]))
        else:
            todo.append({"id": int(task["id"]), "data": task.get("data") or {}})
    return PrelabelPlan(project_id, model_version, todo, skipped, len(tasks), current)


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive slices of ``size`` items."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def run_prelabel(
    client: Any,
    project_id: int,
    *,
    settings: Settings,
    runner: JobRunner,
    model_version: str,
    versions: Sequence[str] = (),
    label_studio_url: str | None = None,
    chunk_size: int = 8,
    force: bool = False,
    parallel: int | None = None,
    chunk_timeout: float | None = None,
    progress: bool = True,
    owners: TaskOwners | None = None,
) -> PrelabelReport:
    """Predict every task of ``project_id`` that lacks a current prediction and push the results.

    ``model_version`` is the announced version and ``versions`` the names the configured engines give
    their predictions (a task holding one of them is skipped). Chunks run on ``runner``, ``parallel`` at a
    time (default: one per worker); each prediction is stored under its own engine's name. ``owners``
    (with Redis): each chunk claims its tasks, and skips those a backend's background run owns.
    """
    from tqdm import tqdm

    from groundlabel.ls_client import get_project, iter_tasks
    from groundlabel.spec import read_spec
    from labeling_backend.metrics import Metrics
    from labeling_backend.service import Dispatcher

    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    project = get_project(client, project_id)
    spec = read_spec(project.label_config or "", settings)
    tasks = list(iter_tasks(client, project_id))
    tagged = None if settings.backend.model_version else spec  # the operator's name is kept as it is
    plan = plan_tasks(tasks, project_id, model_version, force=force, versions=versions, spec=tagged)
    report = PrelabelReport(plan)
    if not plan.todo:
        return report

    jobs = settings.queue
    metrics = Metrics(runner.stats)
    dispatcher = Dispatcher(settings.with_(chunk_size=chunk_size), runner, metrics, model_version, versions)
    if chunk_timeout is None:
        chunk_timeout = jobs.job_timeout * (jobs.job_retries + 1) + sum(jobs.retry_intervals) + 60
    if parallel is None:
        parallel = max(1, runner.worker_count())
    chunks = chunked(plan.todo, chunk_size)
    bar = tqdm(total=len(plan.todo), unit="task", desc=f"project {project_id}", disable=not progress)
    owner = f"prelabel-{uuid.uuid4().hex[:12]}"

    def predict_chunk(chunk: list[dict[str, Any]]) -> Any:
        return dispatcher.answer_blocking(
            chunk, spec, label_studio_url=label_studio_url, timeout=chunk_timeout
        )

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="prelabel") as pool:
        pending: dict[Future, list[dict[str, Any]]] = {}
        queue = list(chunks)
        while queue or pending:
            while queue and len(pending) < parallel:
                chunk = queue.pop(0)
                if owners is not None:
                    held = set(owners.claim(str(project_id), [t["id"] for t in chunk], owner))
                    report.busy.extend(t["id"] for t in chunk if t["id"] not in held)
                    bar.update(len(chunk) - len(held))
                    chunk = [t for t in chunk if t["id"] in held]
                    if not chunk:
                        continue
                pending[pool.submit(predict_chunk, chunk)] = chunk
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                chunk = pending.pop(future)
                _collect(client, project_id, chunk, future, report, replace=force)
                if owners is not None:
                    written = set(report.done)
                    owners.settle(str(project_id), [t["id"] for t in chunk if t["id"] in written], owner)
                    owners.release(str(project_id), [t["id"] for t in chunk if t["id"] not in written], owner)
                bar.update(len(chunk))
                bar.set_postfix(done=len(report.done), failed=len(report.failed))
    bar.close()
    return report


def _collect(
    client: Any,
    project_id: int,
    chunk: list[dict[str, Any]],
    future: Future,
    report: PrelabelReport,
    *,
    replace: bool = False,
) -> None:
    """Record one finished chunk and import its predictions.

    ``replace``: the tasks' older predictions of the same model version (the engine's that answered,
    which each prediction carries) are deleted once the new ones
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
                "model_version": answer.prediction.get("model_version"),
            }
        )
    try:
        old: list[int] = []
        if replace:
            for p in predictions:
                old.extend(prediction_ids(client, p["task"], p["model_version"]))
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
