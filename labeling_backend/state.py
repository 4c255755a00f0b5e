"""What the backend keeps between requests: :class:`BackendState` (settings, versions, the runner, the
metrics, the training jobs, the background runs), which the app, its routes, dependencies and handlers
share."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from groundlabel.protocol import JobRunner
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec, read_spec
from labeling_backend.background import BackgroundRuns
from labeling_backend.metrics import Metrics
from labeling_backend.quality import Quality
from labeling_backend.queue import RedisJobQueue
from labeling_backend.training import Training

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
        kv = runner.connection if isinstance(runner, RedisJobQueue) else None
        #: Late tasks of /predict finished and written into Label Studio (``labeling_backend.background``).
        self.background = BackgroundRuns(settings, runner, self.metrics, kv)
        self.metrics.registry.register(self.background)
        #: First-try quality measured from the annotation webhooks (``labeling_backend.quality``).
        self.quality = Quality(settings)
        self.metrics.registry.register(self.quality)
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
        self.quality.close()
