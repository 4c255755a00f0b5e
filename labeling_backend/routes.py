"""The endpoints of Label Studio's ML backend protocol.

``/predict`` answers ``{"results": [...], "model_version": ..., "errors": [...]}`` with exactly one element
per task, in order. A task with a prediction gets ``{"result", "score", "model_version"}``, the
``model_version`` being the engine's that produced it. A batch task without one (failed, or not done before
the deadline) gets ``[]``, a list of zero predictions: Label Studio then saves nothing for it and asks again
next time, instead of storing an empty prediction under the current model version (which would hide the
task from every later run). The reasons are in ``errors``. An interactive request (one task with a
``context``) gets one prediction dict, with ``"error"`` set and an empty ``result`` when there is nothing
to show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from groundlabel.errors import UserError
from groundlabel.ls_format import context_clicks, results_text
from groundlabel.protocol import QueueUnavailable
from groundlabel.versions import replaced_by, trained_names
from labeling_backend.dependencies import get_state, json_body, metrics_auth, require_auth
from labeling_backend.schemas import (
    WEBHOOK_ACTIONS,
    JobStatusRequest,
    PredictRequest,
    SetupRequest,
    TrainRequest,
    WebhookRequest,
    optional_project,
)
from labeling_backend.service import Dispatcher, TaskAnswer
from labeling_backend.state import MODEL_CLASS, BackendState

log = logging.getLogger("groundlabel.backend")

#: The backend's state, as an endpoint parameter.
State = Annotated[BackendState, Depends(get_state)]
#: Request bodies, decoded and validated on a worker thread (never on the event loop).
Setup = Annotated[SetupRequest, Depends(json_body(SetupRequest))]
Predict = Annotated[PredictRequest, Depends(json_body(PredictRequest))]
Webhook = Annotated[WebhookRequest, Depends(json_body(WebhookRequest))]
Train = Annotated[TrainRequest, Depends(json_body(TrainRequest))]
JobStatus = Annotated[JobStatusRequest, Depends(json_body(JobStatusRequest))]

router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_auth)])


@router.get("/health")
@router.get("/")
async def health(state: State) -> JSONResponse:
    """Whether the backend and its job queue answer; open to anyone.

    The runner is read on the state's own two-thread pool, never on the pool the other endpoints share,
    and no request waits on a thread, so this answers at once whatever ``/predict`` is doing.
    """
    loop = asyncio.get_running_loop()
    body, code = await loop.run_in_executor(state.health_pool, _health, state)
    return JSONResponse(body, status_code=code)


def _health(state: BackendState) -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {"status": "UP", "model_class": MODEL_CLASS, "model_version": state.model_version}
    code = 200
    try:
        state.runner.ping()
        body["queue"] = state.runner.where
        body["workers"] = state.runner.worker_count()
        warm = getattr(state.runner, "warm_state", None)
        if warm is not None:
            body["engines"] = warm()
        body["background"] = state.background.health()
    except QueueUnavailable as exc:
        body.update(status="DOWN", reason=str(exc))
        code = 503
    return body, code


@protected.post("/setup")
def setup(body: Setup, state: State) -> dict[str, Any]:
    """Remember the project's label config; answer its model version (never loads a model).

    The version is the announced one followed by the spec's tag (see :func:`groundlabel.versions.versioned`),
    so changing an option of the label config makes Label Studio ask for new predictions.
    """
    version = state.model_version
    if body.label_schema:
        spec = state.spec(body.label_schema)  # a config groundlabel cannot fill is reported now
        version = _dispatcher(state, body.project).announced(spec)
    if isinstance(body.extra_params, str) and body.extra_params.strip():
        try:
            json.loads(body.extra_params)
        except json.JSONDecodeError as exc:
            raise UserError(f"extra_params is not valid JSON: {exc}") from exc
    state.projects[body.project or ""] = {"schema": body.label_schema, "hostname": body.hostname}
    return {"model_version": version}


def _dispatcher(state: BackendState, project: str | None = None) -> Dispatcher:
    """The dispatcher for ``project``: a trained version promoted for it is announced, and its results are
    looked up first (the store is read on every request, so a promotion shows at once). The version
    record's ``kind`` says which base predictions it replaces (:func:`groundlabel.versions.replaced_by`)."""
    trained = state.training.promoted_version(project)
    version, versions = state.model_version, state.versions
    if trained is not None:
        own = trained_names(trained.name, trained.kind)
        kinds = [trained.kind]
        under = state.training.served_trained(project) if trained.kind == "calibration" else None
        if under is not None:  # a calibration over a trained version: its names answer the rest
            own, kinds = [*own, *trained_names(under.name, under.kind)], [*kinds, under.kind]
        kept = (v for v in versions if not any(replaced_by(k, v) for k in kinds))
        version, versions = trained.name, [*own, *kept]
    return Dispatcher(
        state.settings,
        state.runner,
        state.metrics,
        version,
        versions,
        project=project or None,
        stopping=state.stopping,
    )


@protected.post("/predict")
async def predict(body: Predict, state: State) -> JSONResponse:
    """One prediction per task, in order (see the module docstring for failed tasks).

    The request waits for its jobs on the event loop (no thread is held while it waits); its body is
    decoded, and its tasks hashed and serialized, on worker threads.
    """
    settings = state.settings
    if len(body.tasks) > settings.backend.max_tasks:
        raise UserError(
            f"{len(body.tasks)} tasks in one request; the limit is {settings.backend.max_tasks} "
            "(GROUNDLABEL_MAX_TASKS)"
        )
    project = state.projects.get(body.project or "", {})
    xml = body.label_config or project.get("schema")
    if not xml:
        raise UserError("the request has no label_config and no /setup gave one for this project")
    spec = await asyncio.to_thread(state.spec, xml)
    context = (
        body.params.context.model_dump(exclude_none=True) if body.params and body.params.context else None
    )
    if context is not None and not context.get("result"):
        context = None
    try:
        context_clicks(context)  # a malformed click or box is refused here, not in a job
    except UserError as exc:  # the reason names the field, never its value
        raise HTTPException(422, f"invalid request: params.context: {exc}") from exc
    ls_url = body.hostname or project.get("hostname")
    start = time.perf_counter()
    runs = state.background
    background = context is None and bool(body.project) and runs.off_reason() is None
    owned: dict[int, str] = {}
    if background:  # tasks a background run (or prelabel) is writing are left to it
        owned = await asyncio.to_thread(runs.owned, body.project, [t.id for t in body.tasks])
    tasks = [{"id": t.id, "data": t.data} for t in body.tasks if t.id not in owned]
    dispatcher = await asyncio.to_thread(_dispatcher, state, body.project)
    outcome = await dispatcher.answer(
        tasks, spec, context=context, label_studio_url=ls_url, detach=background
    )
    if background and outcome.answers:  # a run that took a task over while this request waited keeps it
        answered = [a.task_id for a in outcome.answers if a.prediction is not None]
        owned.update(await asyncio.to_thread(runs.owned, body.project, answered))
    late_sources = ("timeout", "stopping") if runs.durable else ("timeout",)
    late = [a for a in outcome.answers if a.source in late_sources and a.key]
    if late and background:
        run = await asyncio.to_thread(runs.start, str(body.project), spec, dispatcher, late, tasks, ls_url)
        for answer in late if run is not None else ():
            answer.error = (
                f"not finished within the request's deadline: background run {run.id} finishes it and "
                "writes its prediction into Label Studio (see GET /background)"
            )
    elif late and context is None:
        log.info("%d task(s) not finished in time: %s", len(late), runs.off_reason() or "no project given")
    answers = {a.task_id: a for a in outcome.answers}
    for task_id, owner in owned.items():
        reason = f"being predicted by {_owner_name(owner)}: its prediction is written into Label Studio"
        answers[task_id] = TaskAnswer(task_id, error=reason)
    mv = outcome.model_version
    results: list[Any] = []
    errors: list[dict[str, Any]] = []
    for answer in (answers[t.id] for t in body.tasks):
        if answer.prediction is not None:
            results.append({k: v for k, v in answer.prediction.items() if k != "error"})
        else:
            errors.append({"task": answer.task_id, "error": answer.error})
            if outcome.interactive:
                results.append({"result": [], "score": 0.0, "model_version": mv, "error": answer.error})
            else:
                results.append([])
    log.info(
        "predict project=%s tasks=%d answered=%d errors=%d jobs=%d interactive=%s %.2fs",
        body.project or "-",
        len(body.tasks),
        len(body.tasks) - len(errors),
        len(errors),
        len(outcome.jobs),
        outcome.interactive,
        time.perf_counter() - start,
    )
    for err in errors[:5]:
        log.info("task %s: %s", err["task"], err["error"])
    return JSONResponse({"results": results, "model_version": mv, "errors": errors})


def _owner_name(owner: str) -> str:
    """A task owner as a person reads it: a background run's id, or ``groundlabel prelabel``."""
    return "groundlabel prelabel" if owner.startswith("prelabel") else f"background run {owner}"


@protected.get("/background")
def background_runs(state: State) -> dict[str, Any]:
    """The latest background runs (newest first) and whether new ones start."""
    return {
        "enabled": state.background.off_reason() is None,
        "reason": state.background.off_reason(),
        "runs": [run.to_dict() for run in state.background.runs()],
    }


@protected.post("/background/{run_id}/cancel")
def cancel_background(run_id: str, state: State) -> dict[str, Any]:
    """Stop a background run: nothing more of it is written into Label Studio."""
    if not run_id.isalnum() or len(run_id) > 64:
        raise HTTPException(404, "no such background run")
    try:
        return state.background.cancel(run_id).to_dict()
    except UserError as exc:
        raise HTTPException(404, str(exc)) from exc


@protected.post("/webhook")
def webhook(body: Webhook, state: State) -> JSONResponse:
    """Label Studio's events. ``START_TRAINING`` (the *Start Training* button) enqueues a training job and
    answers its id at once; an annotation created or updated echoes its typed expression, counts towards
    ``GROUNDLABEL_TRAIN_EVERY`` and is queued for the live quality measures (``labeling_backend.quality``)."""
    if body.action not in WEBHOOK_ACTIONS:
        return JSONResponse({"status": "Unknown event", "action": body.action}, status_code=200)
    project_id = (body.project.id if body.project else None) or ""
    hostname = state.projects.get(project_id, {}).get("hostname")
    result: dict[str, Any] = {"action": body.action, "project": project_id}
    answer: dict[str, Any] = {"status": "ok", "result": result}
    if body.action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        regions = [r.model_dump(exclude_none=True) for r in body.annotation.result] if body.annotation else []
        text = results_text(regions)
        if text:
            result["latest_prompt"] = text
        if project_id and body.annotation is not None:  # measured later, on the quality thread
            annotation = {**(body.annotation.model_extra or {}), "result": regions}
            state.quality.annotation_event(project_id, annotation, body.task, label_studio_url=hostname)
        started = state.training.annotation_changed(project_id, label_studio_url=hostname)
        if started:
            result["training"] = started
            answer["job"] = started["job"]
    elif body.action == "START_TRAINING":
        if not project_id:
            raise UserError("START_TRAINING without a project id")
        started = state.training.start(project_id, trigger="START_TRAINING", label_studio_url=hostname)
        result["training"] = started
        answer["job"] = started["job"]
    return JSONResponse(answer, status_code=201)


@protected.post("/train")
def train(body: Train, state: State) -> JSONResponse:
    """Label Studio's older *Start Training* call: the same training job as ``START_TRAINING``."""
    project_id = body.project
    if not project_id:
        raise UserError("/train needs the project")
    hostname = state.projects.get(project_id, {}).get("hostname")
    started = state.training.start(project_id, trigger="/train", label_studio_url=hostname)
    return JSONResponse({"status": "ok", "job": started["job"], "result": started}, status_code=201)


@protected.post("/job_status")
def training_job_status(body: JobStatus, state: State) -> JSONResponse:
    """A training job's state (``job_status``: queued, started, finished, failed), progress and outcome;
    410 when the backend knows no such training job (Label Studio then forgets it)."""
    status = state.training.job_status(body.job)
    if status is None or (body.project is not None and status.get("project") != body.project):
        return JSONResponse({"detail": "no such training job"}, status_code=410)
    return JSONResponse(status)


@protected.get("/versions")
def versions(state: State, project: str | None = None) -> dict[str, Any]:
    """The model versions: the base models' and the trained ones (of ``?project=N``, else of every
    project), oldest first; ``details`` has each trained version's held-out metric and promotion. A project
    whose store files are broken is left out of the whole list (``errors`` says why) and answers 409 alone."""
    try:
        canonical = optional_project(project)
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("query", "project"), "msg": f"Value error, {exc}", "type": "value_error"}]
        ) from None
    details, errors = state.training.versions(canonical)
    answer: dict[str, Any] = {"versions": [state.model_version, *(d["name"] for d in details)]}
    answer["details"] = details
    if errors:
        answer["errors"] = errors
    return answer


@router.get("/metrics", dependencies=[Depends(metrics_auth)])
def metrics(state: State) -> Response:
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


router.include_router(protected)
