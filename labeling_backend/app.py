"""The HTTP service: Label Studio's ML backend protocol on FastAPI.

``GET /health`` and ``GET /`` (open), ``POST /setup``, ``POST /predict``, ``POST /webhook`` and
``GET /metrics`` (behind basic auth or a bearer token when one is configured; ``/metrics`` is open with
``GROUNDLABEL_METRICS_PUBLIC=true``). This module never imports torch: jobs run on RQ workers, or in
spawned child processes when ``REDIS_URL`` is not set.

``/predict`` answers ``{"results": [...], "model_version": ..., "errors": [...]}`` with exactly one element
per task, in order. A task with a prediction gets ``{"result", "score", "model_version"}``. A batch task
without one (failed, or not done before the deadline) gets ``[]``, a list of zero predictions: Label Studio
then saves nothing for it and asks again next time, instead of storing an empty prediction under the
current model version (which would hide the task from every later run). The reasons are in ``errors``.
An interactive request (one task with a ``context``) gets one prediction dict, with ``"error"`` set and
an empty ``result`` when there is nothing to show.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from groundlabel.errors import UserError
from labeling_backend.auth import check_authorization, install_log_redaction, www_authenticate
from labeling_backend.label_config import LabelingSpec, parse_label_config
from labeling_backend.metrics import Metrics
from labeling_backend.queue import QueueUnavailable
from labeling_backend.schemas import WEBHOOK_ACTIONS, PredictRequest, SetupRequest, WebhookRequest
from labeling_backend.service import JobRunner, Predictor
from labeling_backend.settings import Settings

log = logging.getLogger("groundlabel.backend")

MODEL_CLASS = "GroundLabel"


class _AuthError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=64)
def _parse_spec(xml: str) -> LabelingSpec:
    return parse_label_config(xml)


def _make_runner(settings: Settings, warm_up: bool) -> JobRunner:
    if settings.redis_url:
        from labeling_backend.queue import RedisJobQueue

        return RedisJobQueue(settings)
    from labeling_backend.inprocess import InProcessRunner

    return InProcessRunner(settings, warm_up=warm_up)


class BackendState:
    """What the app keeps between requests: the runner, per-project setup, the latest prompts."""

    def __init__(self, settings: Settings, runner: JobRunner | None, warm_up: bool) -> None:
        self.settings = settings
        self._runner = runner
        self._warm_up = warm_up
        self._lock = threading.Lock()
        self.projects: dict[str, dict[str, Any]] = {}
        self.latest_prompts: dict[str, str] = {}
        self.metrics = Metrics(lambda: self.runner.stats())
        self.started = time.time()

    @property
    def runner(self) -> JobRunner:
        with self._lock:
            if self._runner is None:
                self._runner = _make_runner(self.settings, self._warm_up)
            return self._runner

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()


def _project_key(project: str | None) -> str:
    return (project or "").split(".")[0]


def create_app(
    settings: Settings | None = None, *, runner: JobRunner | None = None, warm_up: bool = True
) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the environment).

    ``runner`` replaces the job runner (RQ when ``REDIS_URL`` is set, else spawned child processes);
    ``warm_up`` loads the engines in the child processes at start-up.
    """
    settings = settings or Settings.from_env()
    state = BackendState(settings, runner, warm_up)
    install_log_redaction(settings.secrets())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_enabled:
            log.warning("no BASIC_AUTH_USER/BASIC_AUTH_PASS nor GROUNDLABEL_API_TOKEN: the API is open")
        if not settings.redis_url and warm_up:
            _ = state.runner  # start the child processes (they load the models) before the first request
        yield
        state.close()

    app = FastAPI(
        title="groundlabel", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = state

    # -- errors --------------------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep location and message; leave out the offending input (it may hold credentials).
        problems = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems)
        return JSONResponse(
            {"detail": f"invalid request: {summary}", "errors": jsonable_encoder(problems)}, status_code=422
        )

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(QueueUnavailable)
    async def _unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(_AuthError)
    async def _auth_error(request: Request, exc: _AuthError) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.reason}, status_code=401, headers={"WWW-Authenticate": www_authenticate(settings)}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    # -- request metrics -----------------------------------------------------------------------------

    @app.middleware("http")
    async def _count(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        endpoint = path if path in ("/", "/health", "/setup", "/predict", "/webhook", "/metrics") else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            state.metrics.requests.labels(endpoint, str(status)).inc()
            state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    # -- auth ----------------------------------------------------------------------------------------

    def require_auth(request: Request) -> None:
        reason = check_authorization(request.headers.get("authorization"), settings)
        if reason is not None:
            raise _AuthError(reason)

    def metrics_auth(request: Request) -> None:
        if not settings.metrics_public:
            require_auth(request)

    # -- open endpoints ------------------------------------------------------------------------------

    def health() -> JSONResponse:
        body: dict[str, Any] = {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": settings.model_version,
        }
        code = 200
        try:
            runner_ = state.runner
            runner_.ping()
            body["queue"] = runner_.where
            body["workers"] = runner_.worker_count()
            warm = getattr(runner_, "warm_state", None)
            if warm is not None:
                body["engines"] = warm()
        except QueueUnavailable as exc:
            body.update(status="DOWN", reason=str(exc))
            code = 503
        return JSONResponse(body, status_code=code)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", health, methods=["GET"])

    # -- protected endpoints -------------------------------------------------------------------------

    api = APIRouter(dependencies=[Depends(require_auth)])

    @api.post("/setup")
    def setup(body: SetupRequest) -> dict[str, Any]:
        """Remember the project's label config; answer the model version (never loads a model)."""
        key = _project_key(body.project)
        if body.label_schema:
            _parse_spec(body.label_schema)  # a config groundlabel cannot fill is reported now
        extra = body.extra_params
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra.strip() else {}
            except json.JSONDecodeError as exc:
                raise UserError(f"extra_params is not valid JSON: {exc}") from exc
        state.projects[key] = {
            "schema": body.label_schema,
            "hostname": body.hostname,
            "extra_params": extra or {},
        }
        return {"model_version": settings.model_version}

    @api.post("/predict")
    def predict(body: PredictRequest) -> JSONResponse:
        """One prediction per task, in order (see the module docstring for failed tasks)."""
        if len(body.tasks) > settings.max_tasks:
            raise UserError(
                f"{len(body.tasks)} tasks in one request; the limit is {settings.max_tasks} "
                "(GROUNDLABEL_MAX_TASKS)"
            )
        project = state.projects.get(_project_key(body.project), {})
        xml = body.label_config or project.get("schema")
        if not xml:
            raise UserError("the request has no label_config and no /setup gave one for this project")
        spec = _parse_spec(xml)
        context = (
            body.params.context.model_dump(exclude_none=True) if body.params and body.params.context else None
        )
        if context is not None and not context.get("result"):
            context = None
        ls_url = body.hostname or project.get("hostname")
        tasks = [{"id": t.id, "data": t.data} for t in body.tasks]
        start = time.perf_counter()
        outcome = Predictor(settings, state.runner, state.metrics).predict(
            tasks, spec, context=context, label_studio_url=ls_url
        )
        mv = settings.model_version
        results: list[Any] = []
        errors: list[dict[str, Any]] = []
        for answer in outcome.answers:
            if answer.prediction is not None:
                prediction = {k: v for k, v in answer.prediction.items() if k != "error"}
                results.append(prediction)
            else:
                errors.append({"task": answer.task_id, "error": answer.error})
                if outcome.interactive:
                    results.append({"result": [], "score": 0.0, "model_version": mv, "error": answer.error})
                else:
                    results.append([])
        log.info(
            "predict project=%s tasks=%d answered=%d errors=%d jobs=%d interactive=%s %.2fs",
            _project_key(body.project) or "-",
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

    @api.post("/webhook")
    def webhook(body: WebhookRequest) -> JSONResponse:
        """Label Studio's events: remember the latest typed expression per project; no training."""
        if body.action not in WEBHOOK_ACTIONS:
            return JSONResponse({"status": "Unknown event", "action": body.action}, status_code=200)
        project_id = str((body.project or {}).get("id", ""))
        result: dict[str, Any] = {"action": body.action, "project": project_id}
        if body.action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            text = _annotation_text((body.annotation or {}).get("result") or [])
            if text:
                state.latest_prompts[project_id] = text
                result["latest_prompt"] = text
        elif body.action == "START_TRAINING":
            result["trained"] = False
            result["reason"] = (
                "groundlabel's models are not trained from this backend; export and train offline"
            )
        return JSONResponse({"status": "ok", "result": result}, status_code=201)

    app.include_router(api)

    @app.get("/metrics", dependencies=[Depends(metrics_auth)])
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app


def _annotation_text(regions: list[Any]) -> str | None:
    for region in regions:
        if isinstance(region, dict) and region.get("type") == "textarea":
            text = (region.get("value") or {}).get("text")
            if isinstance(text, list) and text:
                return str(text[0])
            if isinstance(text, str) and text:
                return text
    return None
