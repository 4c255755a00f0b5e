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

import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from groundlabel.errors import UserError
from groundlabel.ls_format import results_text
from groundlabel.protocol import QueueUnavailable
from labeling_backend.app import MODEL_CLASS, BackendState, parse_spec, project_key
from labeling_backend.dependencies import get_state, metrics_auth, require_auth
from labeling_backend.schemas import WEBHOOK_ACTIONS, PredictRequest, SetupRequest, WebhookRequest
from labeling_backend.service import Dispatcher

log = logging.getLogger("groundlabel.backend")

#: The backend's state, as an endpoint parameter.
State = Annotated[BackendState, Depends(get_state)]

router = APIRouter()
protected = APIRouter(dependencies=[Depends(require_auth)])


@router.get("/health")
@router.get("/")
def health(state: State) -> JSONResponse:
    """Whether the backend and its job queue answer; open to anyone."""
    body: dict[str, Any] = {"status": "UP", "model_class": MODEL_CLASS, "model_version": state.model_version}
    code = 200
    try:
        state.runner.ping()
        body["queue"] = state.runner.where
        body["workers"] = state.runner.worker_count()
        warm = getattr(state.runner, "warm_state", None)
        if warm is not None:
            body["engines"] = warm()
    except QueueUnavailable as exc:
        body.update(status="DOWN", reason=str(exc))
        code = 503
    return JSONResponse(body, status_code=code)


@protected.post("/setup")
def setup(body: SetupRequest, state: State) -> dict[str, Any]:
    """Remember the project's label config; answer the model version (never loads a model)."""
    if body.label_schema:
        parse_spec(body.label_schema)  # a config groundlabel cannot fill is reported now
    if isinstance(body.extra_params, str) and body.extra_params.strip():
        try:
            json.loads(body.extra_params)
        except json.JSONDecodeError as exc:
            raise UserError(f"extra_params is not valid JSON: {exc}") from exc
    state.projects[project_key(body.project)] = {"schema": body.label_schema, "hostname": body.hostname}
    return {"model_version": state.model_version}


@protected.post("/predict")
def predict(body: PredictRequest, state: State) -> JSONResponse:
    """One prediction per task, in order (see the module docstring for failed tasks)."""
    settings = state.settings
    if len(body.tasks) > settings.backend.max_tasks:
        raise UserError(
            f"{len(body.tasks)} tasks in one request; the limit is {settings.backend.max_tasks} "
            "(GROUNDLABEL_MAX_TASKS)"
        )
    project = state.projects.get(project_key(body.project), {})
    xml = body.label_config or project.get("schema")
    if not xml:
        raise UserError("the request has no label_config and no /setup gave one for this project")
    spec = parse_spec(xml)
    context = (
        body.params.context.model_dump(exclude_none=True) if body.params and body.params.context else None
    )
    if context is not None and not context.get("result"):
        context = None
    ls_url = body.hostname or project.get("hostname")
    tasks = [{"id": t.id, "data": t.data} for t in body.tasks]
    start = time.perf_counter()
    outcome = Dispatcher(settings, state.runner, state.metrics, state.model_version).answer(
        tasks, spec, context=context, label_studio_url=ls_url
    )
    mv = state.model_version
    results: list[Any] = []
    errors: list[dict[str, Any]] = []
    for answer in outcome.answers:
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
        project_key(body.project) or "-",
        len(tasks),
        len(tasks) - len(errors),
        len(errors),
        len(outcome.jobs),
        outcome.interactive,
        time.perf_counter() - start,
    )
    for err in errors[:5]:
        log.info("task %s: %s", err["task"], err["error"])
    return JSONResponse({"results": results, "model_version": mv, "errors": errors})


@protected.post("/webhook")
def webhook(body: WebhookRequest) -> JSONResponse:
    """Label Studio's events: acknowledged (an annotation's typed expression is echoed); no training."""
    if body.action not in WEBHOOK_ACTIONS:
        return JSONResponse({"status": "Unknown event", "action": body.action}, status_code=200)
    project_id = str((body.project or {}).get("id", ""))
    result: dict[str, Any] = {"action": body.action, "project": project_id}
    if body.action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        text = results_text((body.annotation or {}).get("result") or [])
        if text:
            result["latest_prompt"] = text
    elif body.action == "START_TRAINING":
        result["trained"] = False
        result["reason"] = "groundlabel's models are not trained from this backend; export and train offline"
    return JSONResponse({"status": "ok", "result": result}, status_code=201)


@router.get("/metrics", dependencies=[Depends(metrics_auth)])
def metrics(state: State) -> Response:
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


router.include_router(protected)
