"""The HTTP service: Label Studio's ML backend protocol on FastAPI.

``GET /health`` and ``GET /`` (open), ``POST /setup``, ``POST /predict``, ``POST /webhook`` and
``GET /metrics`` (behind basic auth or a bearer token when one is configured; ``/metrics`` is open with
``GROUNDLABEL_METRICS_PUBLIC=true``). This package never imports torch nor the workers: it talks to a
:class:`~groundlabel.protocol.JobRunner`, RQ on Redis when ``REDIS_URL`` is set, or the runner the command
that starts it passes in (``groundlabel serve`` passes the workers' in-process runner).

The endpoints are in :mod:`labeling_backend.routes`, the request dependencies (authentication, the
state) in :mod:`labeling_backend.dependencies`, the error handlers and request metrics in
:mod:`labeling_backend.handlers`, the door (credentials and the body cap, checked before a body is read)
in :mod:`labeling_backend.guard`. ``/predict`` waits for its jobs on the event loop, holding no thread;
``/health`` reads the runner on its own small thread pool, so it answers whatever ``/predict`` does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from groundlabel.protocol import JobRunner
from groundlabel.redaction import install_log_redaction
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec, read_spec
from labeling_backend.metrics import Metrics
from labeling_backend.training import Training

log = logging.getLogger("groundlabel.backend")

MODEL_CLASS = "GroundLabel"


class BackendState:
    """What the app keeps between requests: settings, the announced version, the runner, project setups.

    ``versions`` are the names the configured engines give their predictions (the result cache is read
    under each); by default the announced version alone.
    """

    def __init__(
        self, settings: Settings, runner: JobRunner, model_version: str, versions: Sequence[str] = ()
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.model_version = model_version
        self.versions = list(versions) or [model_version]
        self.projects: dict[str, dict[str, Any]] = {}  # project -> {"schema", "hostname"} from /setup
        self.metrics = Metrics(lambda: self.runner.stats())
        self.training = Training(settings)  # training jobs and the trained versions per project
        self.metrics.registry.register(self.training)
        self.started = time.time()
        self.health_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
        self._spec_lock = threading.Lock()
        #: Set when the server begins to stop: waiting requests answer at once with what is ready.
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the app serves on (:meth:`begin_shutdown` wakes it)."""
        self._loop = loop

    def begin_shutdown(self) -> None:
        """Make waiting requests answer now (from any thread or a signal handler): the server is stopping,
        so a ``/predict`` in flight does not hold the shutdown for its whole deadline."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.stopping.set)

    def spec(self, xml: str) -> LabelingSpec:
        """The checked spec of a label config with the settings' defaults (``groundlabel.spec.read_spec``).

        One thread parses at a time: many requests arriving with a new config wait for one parse instead
        of parsing it side by side (the parse is CPU-bound and would starve the event loop of the GIL).
        """
        with self._spec_lock:
            return read_spec(xml, self.settings)

    def close(self) -> None:
        """Close the runner and the health pool."""
        self.health_pool.shutdown(wait=False, cancel_futures=True)
        self.runner.close()
        self.training.close()


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
        yield
        state.close()

    app = FastAPI(
        title="groundlabel", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = state
    app.add_middleware(Guard, settings=settings.backend)
    install_handlers(app, state)
    app.include_router(router)
    return app
