"""Error answers and request metrics for every endpoint."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from groundlabel.errors import UserError
from groundlabel.model_store import StoreFileError
from groundlabel.protocol import QueueUnavailable
from labeling_backend.auth import www_authenticate
from labeling_backend.dependencies import AuthError
from labeling_backend.state import BackendState

log = logging.getLogger("groundlabel.backend")

#: Paths counted under their own name in the request metrics; the rest count as "other".
ENDPOINTS = (
    "/", "/health", "/setup", "/predict", "/webhook", "/train", "/job_status", "/versions", "/metrics",
    "/background",
)  # fmt: skip


def install_handlers(app: FastAPI, state: BackendState) -> None:
    """Register the exception handlers and the request-metrics middleware on ``app``."""

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

    @app.exception_handler(StoreFileError)
    async def _store_error(request: Request, exc: StoreFileError) -> JSONResponse:
        # A broken file of one project's store: a conflict for that project, never a 500.
        log.warning("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(QueueUnavailable)
    async def _unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": www_authenticate(state.settings.backend)}
        return JSONResponse({"detail": exc.reason}, status_code=401, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            state.metrics.requests.labels(endpoint, str(status)).inc()
            state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
