"""First-try quality, live: annotation webhooks measured against the prediction each annotation started from.

Every ``ANNOTATION_CREATED`` (and an ``ANNOTATION_UPDATED`` of an annotation this backend has not measured
yet) is handed to :meth:`Quality.annotation_event`, which only puts it on a bounded queue: the webhook answers
at once. One thread of its own hands the events in turn to a child process (started on the first event), which
finds the prediction the annotation started from (in the event's task when Label Studio sent its predictions,
otherwise read through Label Studio's API with ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``, one request
per event, with a timeout) and measures the pair with :mod:`groundlabel.corrections`, what ``groundlabel
report`` measures: reading and measuring never hold the backend's interpreter lock while requests wait. The
thread adds the figures up per project, label and model version. :meth:`Quality.collect` exposes them on
``/metrics``:

- ``groundlabel_quality_annotations_total{project, model_version}``: annotations measured (``none``: made
  without a prediction);
- ``groundlabel_quality_mask_iou`` and ``groundlabel_quality_boundary_f`` (histograms) ``{project, label,
  model_version}``: one observation per task and label of a brush or polygon control;
- ``groundlabel_quality_box_iou`` and ``groundlabel_quality_point_distance_pixels`` (histograms): one per
  matched rectangle, key point;
- ``groundlabel_quality_regions_total{project, label, model_version, change}``: regions kept, edited,
  deleted, added;
- ``groundlabel_quality_lead_time_seconds`` (histogram) ``{project, model_version}``;
- ``groundlabel_quality_events_total{outcome}``: what became of each event (measured, already measured,
  prediction unknown, failed, dropped because the queue was full).

The series are bounded: past :data:`MAX_SERIES` (project, label, model version) series, a new label is
counted as ``_other`` (then a new version, then a new project). An annotation is counted once: its id is
remembered when it is queued (the last :data:`REMEMBERED` ones), so an update of an annotation already
measured changes nothing. The figures live in this process and start from zero when it starts, as
Prometheus counters do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from groundlabel.corrections import NO_PREDICTION, measure_annotation, started_from
from groundlabel.errors import UserError
from groundlabel.settings import Settings

log = logging.getLogger("groundlabel.backend")

#: Events waiting to be measured; past this many, new ones are dropped (and counted).
MAX_QUEUE = 1000
#: (project, label, model version) series at most; past them, new ones are counted under ``_other``.
MAX_SERIES = 2000
#: Annotations remembered as measured (an update of one of them is not counted again).
REMEMBERED = 100_000
#: Seconds one read of a task's predictions from Label Studio may take.
FETCH_TIMEOUT = 10.0
OTHER = "_other"
#: Histogram buckets.
IOU_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DISTANCE_BUCKETS = (1, 2, 5, 10, 20, 50, 100)
LEAD_TIME_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
#: What became of the events: the values of ``groundlabel_quality_events_total``'s ``outcome``.
OUTCOMES = ("measured", "already_measured", "cancelled", "prediction_unknown", "failed", "dropped")


class _Histogram:
    """Cumulative bucket counts and a sum, as Prometheus histograms hold them."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1

    def exposition(self) -> tuple[list[tuple[str, float]], float]:
        cumulative, total = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return cumulative, self.sum


@dataclass
class _Figures:
    """Everything measured for one (project, label, model version)."""

    mask_iou: _Histogram = field(default_factory=lambda: _Histogram(IOU_BUCKETS))
    boundary_f: _Histogram = field(default_factory=lambda: _Histogram(IOU_BUCKETS))
    box_iou: _Histogram = field(default_factory=lambda: _Histogram(IOU_BUCKETS))
    point_distance: _Histogram = field(default_factory=lambda: _Histogram(DISTANCE_BUCKETS))
    changes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Event:
    project: str
    annotation: dict[str, Any]
    task: dict[str, Any]
    label_studio_url: str | None


class _Measurer:
    """What the measuring process does with an event: find the prediction the annotation started from (the
    event's own, else read through Label Studio) and measure the pair."""

    def __init__(self, settings: Settings, client_factory: Callable[[str], Any] | None = None) -> None:
        self.settings = settings
        self.client_factory = client_factory
        self.clients: dict[str, Any] = {}

    def __call__(self, event: _Event) -> tuple[str, Any]:
        """``("measured", TaskMeasures)``, or ``("prediction_unknown", reason)``."""
        try:
            predictions = self.predictions(event)
        except UserError as exc:
            return "prediction_unknown", str(exc)
        annotation = event.annotation
        prediction = started_from({"predictions": predictions}, annotation)
        return "measured", measure_annotation(
            annotation, prediction, task=event.task.get("id", annotation.get("task"))
        )

    def predictions(self, event: _Event) -> list[dict[str, Any]]:
        """The task's predictions with their regions: the event's own, else read through Label Studio."""
        listed = event.task.get("predictions")
        if isinstance(listed, list) and listed and all(isinstance(p, dict) and "result" in p for p in listed):
            return listed
        if isinstance(listed, list) and not listed and event.annotation.get("parent_prediction") is None:
            return []  # Label Studio said the task has none
        task_id = event.task.get("id", event.annotation.get("task"))
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise UserError("the event names no task")
        fetch = self.settings.fetch
        url = fetch.token_url(event.label_studio_url) if fetch.api_key else None
        if not url:
            raise UserError(
                "reading predictions needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend"
            )
        from groundlabel.ls_client import list_predictions

        try:
            return list_predictions(self.client(url), task_id=task_id)
        except UserError:
            self.clients.pop(url, None)  # a refused or expired token: a new client next time
            raise

    def client(self, url: str) -> Any:
        if url not in self.clients:
            if self.client_factory is not None:
                self.clients[url] = self.client_factory(url)
            else:
                from groundlabel.ls_client import make_client

                self.clients[url] = make_client(url, self.settings.fetch.api_key, timeout=FETCH_TIMEOUT)
        return self.clients[url]


def _measure_forever(conn: Any, measurer: _Measurer) -> None:
    """The measuring process: events in, :meth:`_Measurer.__call__`'s answers out, until the pipe closes. It
    runs at a lower priority than the backend (``nice`` 10): requests get the CPU first."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    while True:
        try:
            event = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer: Any = measurer(event)
        except Exception as exc:  # sent back: the event fails, the process goes on
            answer = ("failed", f"{type(exc).__name__}: {exc}")
        conn.send(answer)


class Quality:
    """Live quality measures of one backend (see the module docstring); a Prometheus collector.

    ``client_factory(url)`` makes the Label Studio client that reads predictions in the measuring process
    (default: :func:`groundlabel.ls_client.make_client` with the settings' key; it must pickle)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_factory: Callable[[str], Any] | None = None,
        max_queue: int = MAX_QUEUE,
        max_series: int = MAX_SERIES,
    ) -> None:
        self.settings = settings
        self.max_series = max_series
        self._client_factory = client_factory
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # the figures
        self._events_lock = threading.Lock()  # the outcome counts (counted while the figures may be held)
        self._seen: OrderedDict[tuple[str, Any], None] = OrderedDict()
        self._events = dict.fromkeys(OUTCOMES, 0)
        self._annotations: dict[tuple[str, str], int] = {}
        self._lead_times: dict[tuple[str, str], _Histogram] = {}
        self._figures: dict[tuple[str, str, str], _Figures] = {}
        self._child: Any = None  # the measuring process, and the pipe to it
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="quality", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------------------

    def annotation_event(
        self,
        project: str,
        annotation: dict[str, Any],
        task: dict[str, Any] | None,
        *,
        label_studio_url: str | None = None,
    ) -> bool:
        """Queue a created or updated annotation for measuring; False when it is not queued (measured
        already, or the queue is full: dropped).

        ``annotation`` is the event's annotation with its ``result`` as plain dicts, ``task`` the event's
        task; both are read later, on the measuring thread."""
        key = (project, annotation.get("id"))
        if key[1] is not None:
            with self._lock:
                seen = key in self._seen
                self._seen[key] = None
                while len(self._seen) > REMEMBERED:
                    self._seen.popitem(last=False)
            if seen:
                self._count("already_measured")
                return False
        try:
            self._queue.put_nowait(_Event(project, annotation, task or {}, label_studio_url))
        except queue.Full:
            self._count("dropped")
            return False
        return True

    # -- the measuring thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    self._stop_child()
                    return
                self.process(event)
            except Exception:  # one bad event never stops the thread
                log.exception("quality: measuring an annotation of project %s failed", event.project)
                self._count("failed")
            finally:
                self._queue.task_done()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until the queued events are measured (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def process(self, event: _Event) -> None:
        """Have one event measured and add it up (on the measuring thread)."""
        if event.annotation.get("was_cancelled"):
            self._count("cancelled")
            return
        outcome, found = self._measure(event)
        if outcome == "failed":
            raise RuntimeError(found)
        if outcome != "measured":
            log.info("quality: project %s: the annotation's prediction is unknown: %s", event.project, found)
            self._count(outcome)
            return
        if found.errors:
            log.info("quality: task %s: %s", found.task, "; ".join(found.errors[:3]))
        with self._lock:
            self._add(event.project, found)
        self._count("measured")

    def _measure(self, event: _Event) -> tuple[str, Any]:
        """The measuring process's answer for ``event`` (the process is started when needed, and again
        when it died)."""
        import multiprocessing

        for attempt in (1, 2):
            if self._child is None or not self._child.is_alive():
                context = multiprocessing.get_context("spawn")
                self._conn, child_conn = context.Pipe()
                measurer = _Measurer(self.settings, self._client_factory)
                self._child = context.Process(
                    target=_measure_forever, args=(child_conn, measurer), name="quality", daemon=True
                )
                self._child.start()
                child_conn.close()
            try:
                self._conn.send(event)
                return self._conn.recv()
            except (EOFError, OSError):
                self._stop_child()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _stop_child(self) -> None:
        if self._child is None:
            return
        with contextlib.suppress(OSError):
            self._conn.close()  # the child ends at the end of its pipe
        self._child.join(5)
        if self._child.is_alive():
            self._child.terminate()
        self._child = None

    # -- adding up -----------------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        with self._events_lock:
            self._events[outcome] += 1

    def _series(self, known: dict[Any, Any], key: tuple[str, ...]) -> tuple[str, ...]:
        """The series ``key`` is counted under in ``known``: itself, or, once :attr:`max_series` exist,
        ``_other`` in its place (first the label, then the version, then the project; the last part of
        ``key`` is the version)."""
        *head, version = key
        candidates = [key]
        if len(head) == 2:
            candidates.append((head[0], OTHER, version))
        candidates += [(head[0], *[OTHER] * len(head)), (OTHER, *[OTHER] * len(head))]
        for candidate in candidates:
            if candidate in known or len(known) < self.max_series:
                return candidate
        return candidates[-1]

    def _add(self, project: str, m: Any) -> None:
        version = (m.model_version or NO_PREDICTION)[:200]
        count_key = self._series(self._annotations, (project, version))
        self._annotations[count_key] = self._annotations.get(count_key, 0) + 1
        if m.lead_time is not None:
            self._lead_times.setdefault(count_key, _Histogram(LEAD_TIME_BUCKETS)).observe(m.lead_time)
        if not m.from_prediction:
            return

        def figures(label: str) -> _Figures:
            return self._figures.setdefault(
                self._series(self._figures, (project, label[:100], version)), _Figures()
            )

        for lm in m.labels:
            f = figures(lm.label)
            f.mask_iou.observe(lm.iou)
            f.boundary_f.observe(lm.boundary_f)
        for rc in m.regions:
            f = figures(rc.label)
            f.changes[rc.change] = f.changes.get(rc.change, 0) + 1
            if rc.kind == "rectangle" and rc.iou is not None:
                f.box_iou.observe(rc.iou)
            if rc.kind == "keypoint" and rc.distance is not None:
                f.point_distance.observe(rc.distance)

    # -- monitoring ----------------------------------------------------------------------------------

    def collect(self) -> Iterable[Any]:  # prometheus_client's collector protocol
        """The figures as Prometheus metric families."""
        series = ["project", "label", "model_version"]
        events = CounterMetricFamily(
            "groundlabel_quality_events", "Annotation events of the live quality measures", labels=["outcome"]
        )
        annotations = CounterMetricFamily(
            "groundlabel_quality_annotations",
            "Annotations measured against the prediction they started from (model_version none: without one)",
            labels=["project", "model_version"],
        )
        lead = HistogramMetricFamily(
            "groundlabel_quality_lead_time_seconds",
            "Lead time of the measured annotations (model_version none: made without a prediction)",
            labels=["project", "model_version"],
        )
        families = {
            "mask_iou": HistogramMetricFamily(
                "groundlabel_quality_mask_iou",
                "Mask IoU of a label's brush and polygon regions, prediction vs annotation, per task",
                labels=series,
            ),
            "boundary_f": HistogramMetricFamily(
                "groundlabel_quality_boundary_f",
                "Boundary F at 2 px of the same masks, per task",
                labels=series,
            ),
            "box_iou": HistogramMetricFamily(
                "groundlabel_quality_box_iou", "Box IoU of each rectangle kept or edited", labels=series
            ),
            "point_distance": HistogramMetricFamily(
                "groundlabel_quality_point_distance_pixels",
                "Distance between a predicted key point and the submitted one",
                labels=series,
            ),
        }
        regions = CounterMetricFamily(
            "groundlabel_quality_regions",
            "Predicted regions kept as predicted, edited or deleted, and regions added, by annotators",
            labels=[*series, "change"],
        )
        with self._events_lock:
            for outcome, count in self._events.items():
                events.add_metric([outcome], count)
        with self._lock:
            for (project, version), count in sorted(self._annotations.items()):
                annotations.add_metric([project, version], count)
            for (project, version), hist in sorted(self._lead_times.items()):
                lead.add_metric([project, version], *hist.exposition())
            for key, f in sorted(self._figures.items()):
                for name, family in families.items():
                    hist = getattr(f, name)
                    if any(hist.counts):
                        family.add_metric(list(key), *hist.exposition())
                for change, count in sorted(f.changes.items()):
                    regions.add_metric([*key, change], count)
        yield from (events, annotations, lead, *families.values(), regions)

    def close(self) -> None:
        """Stop the measuring thread and process (what is still queued is measured first, while the queue
        holds the stop)."""
        with contextlib.suppress(
            queue.Full
        ):  # a full queue: the thread is a daemon, it ends with the process
            self._queue.put_nowait(None)
