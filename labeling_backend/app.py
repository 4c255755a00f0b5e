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

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from groundlabel.errors import UserError
from groundlabel.protocol import JobRunner
from groundlabel.redaction import install_log_redaction
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec, parse_label_config
from labeling_backend.metrics import Metrics
from labeling_backend.training import Training

log = logging.getLogger("groundlabel.backend")

MODEL_CLASS = "GroundLabel"


#: Numeric control options and the range each must lie in (``None``: unbounded).
NUMERIC_OPTIONS: dict[str, tuple[float | None, float | None]] = {
    "model_score_threshold": (0.0, 1.0),
    "polygon_tolerance": (0.0, None),
    "min_region_area": (0.0, None),
    "min_hole_area": (0.0, None),
    "point_width": (0.0, 100.0),
}


def check_options(spec: LabelingSpec) -> None:
    """Refuse a control option that is not a finite number in its range, naming control and option."""
    for control in spec.controls:
        for key, (low, high) in NUMERIC_OPTIONS.items():
            if key not in control.options:
                continue
            value = control.option_float(key, 0.0)
            outside = (low is not None and value < low) or (high is not None and value > high)
            if not math.isfinite(value) or outside:
                bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
                raw = control.options[key]
                raise UserError(f"control {control.name!r}: {key}={raw!r} must lie in {bounds}")


@functools.lru_cache(maxsize=64)
def parse_spec(xml: str, default_threshold: float | None = None) -> LabelingSpec:
    """A label config's spec, parsed and checked once per distinct config.

    ``default_threshold`` (``GROUNDLABEL_DEFAULT_THRESHOLD``) becomes the ``model_score_threshold`` of
    every control that sets none, so it travels in the spec (and keys the cache and the model version).
    """
    spec = parse_label_config(xml)
    check_options(spec)
    if default_threshold is not None:
        for control in spec.controls:
            control.options.setdefault("model_score_threshold", repr(float(default_threshold)))
    return spec


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

    def spec(self, xml: str) -> LabelingSpec:
        """The checked spec of a label config, with the configured default threshold.

        One thread parses at a time: many requests arriving with a new config wait for one parse instead
        of parsing it side by side (the parse is CPU-bound and would starve the event loop of the GIL).
        """
        with self._spec_lock:
            return parse_spec(xml, self.settings.backend.default_threshold)

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
