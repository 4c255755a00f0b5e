"""The HTTP service: Label Studio's ML backend protocol on FastAPI.

``GET /health`` and ``GET /`` (open), ``POST /setup``, ``POST /predict``, ``POST /webhook`` and
``GET /metrics`` (behind basic auth or a bearer token when one is configured; ``/metrics`` is open with
``GROUNDLABEL_METRICS_PUBLIC=true``). This package never imports torch nor the workers: it talks to a
:class:`~groundlabel.protocol.JobRunner`, RQ on Redis when ``REDIS_URL`` is set, or the runner the command
that starts it passes in (``groundlabel serve`` passes the workers' in-process runner).

The state the requests share is :mod:`labeling_backend.state`'s, the endpoints are in
:mod:`labeling_backend.routes`, the request dependencies (authentication, the state) in
:mod:`labeling_backend.dependencies`, the error handlers and request metrics in
:mod:`labeling_backend.handlers`, the door (credentials and the body cap, checked before a body is read)
in :mod:`labeling_backend.guard`. ``/predict`` waits for its jobs on the event loop, holding no thread;
``/health`` reads the runner on its own small thread pool, so it answers whatever ``/predict`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from groundlabel.protocol import JobRunner
from groundlabel.redaction import install_log_redaction
from groundlabel.settings import Settings
from labeling_backend.state import MODEL_CLASS, BackendState

__all__ = ["MODEL_CLASS", "BackendState", "create_app"]

log = logging.getLogger("groundlabel.backend")


def create_app(
    settings: Settings,
    *,
    runner: JobRunner | None = None,
    model_version: str | None = None,
    versions: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app for ``settings``.

    ``runner`` runs the jobs; without one, ``REDIS_URL`` must be set and RQ on Redis is used.
    ``model_version`` is the version announced to Label Studio (the engines' names, computed by the
    command that starts the backend); it defaults to ``GROUNDLABEL_MODEL_VERSION``. ``versions`` are the
    names the engines give their predictions (default: the announced one).
    """
    from labeling_backend.guard import Guard
    from labeling_backend.handlers import install_handlers
    from labeling_backend.routes import router

    version = model_version or settings.backend.model_version
    if not version:
        raise ValueError("create_app needs the announced model version (model_version=...)")
    if runner is None:
        if not settings.queue.redis_url:
            raise ValueError("create_app needs a job runner, or REDIS_URL for RQ on Redis")
        from labeling_backend.queue import RedisJobQueue

        runner = RedisJobQueue(settings.queue)
    state = BackendState(settings, runner, version, versions)
    install_log_redaction(settings.secrets())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.bind_loop(asyncio.get_running_loop())
        if not settings.backend.auth_enabled:
            log.warning("no BASIC_AUTH_USER/BASIC_AUTH_PASS nor GROUNDLABEL_API_TOKEN: the API is open")
        reason = state.background.off_reason()
        if reason:
            log.info("%s", reason)
        driver = None if reason else asyncio.create_task(state.background.serve(state.stopping))
        yield
        state.stopping.set()
        if driver is not None:
            try:
                await asyncio.wait_for(driver, 10)
            except Exception:  # a step still talking to Label Studio: its run is taken over later
                log.warning("background runs: stopped before the last step ended")
        state.close()

    app = FastAPI(
        title="groundlabel", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = state
    app.add_middleware(Guard, settings=settings.backend)
    install_handlers(app, state)
    app.include_router(router)
    return app
