"""The HTTP service: Label Studio's ML backend protocol on FastAPI.

``GET /health`` and ``GET /`` (open), ``POST /setup``, ``POST /predict``, ``POST /webhook`` and
``GET /metrics`` (behind basic auth or a bearer token when one is configured; ``/metrics`` is open with
``GROUNDLABEL_METRICS_PUBLIC=true``). This package never imports torch nor the workers: it talks to a
:class:`~groundlabel.protocol.JobRunner`, RQ on Redis when ``REDIS_URL`` is set, or the runner the command
that starts it passes in (``groundlabel serve`` passes the workers' in-process runner).

The endpoints are in :mod:`labeling_backend.routes`, the request dependencies (authentication, the
state) in :mod:`labeling_backend.dependencies`, the error handlers and request metrics in
:mod:`labeling_backend.handlers`.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from groundlabel.protocol import JobRunner
from groundlabel.redaction import install_log_redaction
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec, parse_label_config
from labeling_backend.metrics import Metrics

log = logging.getLogger("groundlabel.backend")

MODEL_CLASS = "GroundLabel"


@functools.lru_cache(maxsize=64)
def parse_spec(xml: str) -> LabelingSpec:
    """A label config's spec, parsed once per distinct config."""
    return parse_label_config(xml)


class BackendState:
    """What the app keeps between requests: settings, the announced version, the runner, project setups."""

    def __init__(self, settings: Settings, runner: JobRunner, model_version: str) -> None:
        self.settings = settings
        self.runner = runner
        self.model_version = model_version
        self.projects: dict[str, dict[str, Any]] = {}  # project -> {"schema", "hostname"} from /setup
        self.metrics = Metrics(lambda: self.runner.stats())
        self.started = time.time()

    def close(self) -> None:
        """Close the runner."""
        self.runner.close()


def project_key(project: str | None) -> str:
    """Label Studio's ``"<id>.<timestamp>"`` project field to the project id."""
    return (project or "").split(".")[0]


def create_app(
    settings: Settings, *, runner: JobRunner | None = None, model_version: str | None = None
) -> FastAPI:
    """The FastAPI app for ``settings``.

    ``runner`` runs the jobs; without one, ``REDIS_URL`` must be set and RQ on Redis is used.
    ``model_version`` is the version announced to Label Studio (the engines' names, computed by the
    command that starts the backend); it defaults to ``GROUNDLABEL_MODEL_VERSION``.
    """
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
    state = BackendState(settings, runner, version)
    install_log_redaction(settings.secrets())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.backend.auth_enabled:
            log.warning("no BASIC_AUTH_USER/BASIC_AUTH_PASS nor GROUNDLABEL_API_TOKEN: the API is open")
        yield
        state.close()

    app = FastAPI(
        title="groundlabel", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = state
    install_handlers(app, state)
    app.include_router(router)
    return app
