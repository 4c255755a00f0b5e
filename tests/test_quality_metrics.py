"""The backend's live quality measures (labeling_backend/quality.py): annotation events measured off the
request path, the figures of ``groundlabel report``, bounded series, one count per annotation, /metrics."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from exporters.synthetic import make_corrected_export
from groundlabel.corrections import measure_task
from groundlabel.settings import Settings
from labeling_backend.quality import OTHER, Quality

W, H = 120, 90


def settings(**kw) -> Settings:
    return Settings.from_env({}, **kw)


def metrics_text(quality: Quality) -> str:
    registry = CollectorRegistry()
    registry.register(quality)
    return generate_latest(registry).decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def event(task: dict, *, with_predictions: bool = True) -> tuple[dict, dict]:
    """What Label Studio's webhook carries: the annotation, and the task (its predictions only if asked)."""
    annotation = {**task["annotations"][0], "task": task["id"]}
    body_task = {"id": task["id"], "data": task["data"]}
    if with_predictions:
        body_task["predictions"] = task["predictions"]
    return annotation, body_task


@pytest.fixture
def quality():
    q = Quality(settings())
    yield q
    q.close()


def test_events_are_measured_as_the_report_measures_them(quality) -> None:
    tasks, done = make_corrected_export(12, width=W, height=H, seed=5)
    for t in tasks:
        annotation, body_task = event(t)
        assert quality.annotation_event("7", annotation, body_task)
    assert quality.drain()
    text = metrics_text(quality)
    version = tasks[0]["predictions"][0]["model_version"]
    assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 12
    assert sample(text, "groundlabel_quality_annotations_total", project="7", model_version=version) == 12
    measures = [measure_task(t) for t in tasks]
    for change, count in done.items():
        got = sum(
            sample(text, "groundlabel_quality_regions_total", project="7", label=label, change=change)
            for label in ("cat", "dog", "person")
        )
        assert got == count, change
    for label in ("cat", "dog", "person"):
        ious = [m.iou for ms in measures for m in ms.labels if m.label == label]
        labels = {"project": "7", "label": label, "model_version": version}
        assert sample(text, "groundlabel_quality_mask_iou_count", **labels) == len(ious)
        assert sample(text, "groundlabel_quality_mask_iou_sum", **labels) == pytest.approx(
            sum(ious), abs=1e-9
        )
        exact = sum(1 for v in ious if v == 1.0)
        below = sum(1 for v in ious if v <= 0.99)
        assert sample(text, "groundlabel_quality_mask_iou_bucket", le="0.99", **labels) == below
        assert sample(text, "groundlabel_quality_mask_iou_bucket", le="1.0", **labels) == len(ious) >= exact
    lead = [t["annotations"][0]["lead_time"] for t in tasks]
    assert sample(text, "groundlabel_quality_lead_time_seconds_sum", project="7") == pytest.approx(sum(lead))


def test_an_annotation_is_counted_once_and_cancelled_ones_not_at_all(quality) -> None:
    tasks, _ = make_corrected_export(2, width=W, height=H)
    annotation, body_task = event(tasks[0])
    quality.annotation_event("7", annotation, body_task)
    quality.annotation_event("7", copy.deepcopy(annotation), body_task)  # ANNOTATION_UPDATED of the same one
    annotation, body_task = event(tasks[1])
    quality.annotation_event("7", {**annotation, "was_cancelled": True}, body_task)
    assert quality.drain()
    text = metrics_text(quality)
    assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 1
    assert sample(text, "groundlabel_quality_events_total", outcome="already_measured") == 1
    assert sample(text, "groundlabel_quality_events_total", outcome="cancelled") == 1


class StandInLabelStudio:
    """label-studio-sdk's ``client.predictions.list(task=...)`` over generated tasks; made in the measuring
    process, it writes each task asked for and each client made to ``log``."""

    def __init__(self, tasks: list[dict], log: str, url: str = "") -> None:
        self.tasks, self.log = tasks, log
        self.predictions = self
        if url:
            self._write(f"client {url}")

    def __call__(self, url: str) -> StandInLabelStudio:  # the client factory
        return StandInLabelStudio(self.tasks, self.log, url)

    def _write(self, line: str) -> None:
        with open(self.log, "a") as fh:
            fh.write(line + "\n")

    def list(self, project=None, task=None) -> list[dict]:
        self._write(f"task {task}")
        return [copy.deepcopy(p) for t in self.tasks if t["id"] == task for p in t["predictions"]]


def test_predictions_are_read_from_label_studio_when_the_event_has_none(tmp_path) -> None:
    tasks, _ = make_corrected_export(3, width=W, height=H)
    log = tmp_path / "asked.txt"
    s = Settings.from_env({"LABEL_STUDIO_URL": "http://ls.example:8080", "LABEL_STUDIO_API_KEY": "k" * 40})
    q = Quality(s, client_factory=StandInLabelStudio(tasks, str(log)))
    try:
        for t in tasks:
            q.annotation_event("3", *event(t, with_predictions=False))
        assert q.drain()
        text = metrics_text(q)
    finally:
        q.close()
    # one client, one request per event
    assert log.read_text().split("\n")[:-1] == ["client http://ls.example:8080", "task 1", "task 2", "task 3"]
    assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 3

    # without Label Studio's URL and key, the prediction of such an event is unknown
    q = Quality(settings())
    try:
        q.annotation_event("3", *event(tasks[0], with_predictions=False))
        assert q.drain()
        assert sample(metrics_text(q), "groundlabel_quality_events_total", outcome="prediction_unknown") == 1
    finally:
        q.close()


def test_annotations_without_a_prediction_count_their_lead_time(quality) -> None:
    quality.annotation_event(
        "5", {"id": 1, "task": 1, "result": [], "lead_time": 42.0}, {"id": 1, "data": {}, "predictions": []}
    )
    assert quality.drain()
    text = metrics_text(quality)
    assert sample(text, "groundlabel_quality_annotations_total", project="5", model_version="none") == 1
    assert (
        sample(text, "groundlabel_quality_lead_time_seconds_sum", project="5", model_version="none") == 42.0
    )


def test_series_are_bounded() -> None:
    tasks, _ = make_corrected_export(40, width=W, height=H, seed=1)
    q = Quality(settings(), max_series=3)
    try:
        for n, t in enumerate(tasks):
            for r in t["predictions"][0]["result"] + t["annotations"][0]["result"]:
                r["value"][r["type"]] = [f"label{n}"]  # a new label on every task
            t["predictions"][0]["model_version"] = f"gem-v{n % 2}"
            q.annotation_event(str(n % 4 + 1), *event(t))
        assert q.drain()
        text = metrics_text(q)
    finally:
        q.close()
    from prometheus_client.parser import text_string_to_metric_families

    keys = {
        (s.labels["project"], s.labels["label"], s.labels["model_version"])
        for family in text_string_to_metric_families(text)
        if family.name == "groundlabel_quality_regions"
        for s in family.samples
    }
    assert len(keys) <= 3 + 4  # the first series, then _other in the label, version, project
    assert any(label == OTHER for _, label, _ in keys)
    assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 40


def test_a_full_queue_drops_events_and_counts_them() -> None:
    import threading
    import time

    tasks, _ = make_corrected_export(3, width=W, height=H)
    q = Quality(settings(), max_queue=1)
    release = threading.Event()
    measure = q._measure

    def slow(event):  # the measuring thread waits at its first event until released
        release.wait(30)
        return measure(event)

    q._measure = slow
    try:
        assert q.annotation_event("1", *event(tasks[0]))
        deadline = time.monotonic() + 10
        while q._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert q.annotation_event("1", *event(tasks[1]))  # waits in the queue
        assert not q.annotation_event("1", *event(tasks[2]))  # the queue is full: dropped
        release.set()
        assert q.drain()
        text = metrics_text(q)
        assert sample(text, "groundlabel_quality_events_total", outcome="dropped") == 1
        assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 2
    finally:
        release.set()
        q.close()


@pytest.mark.integration
def test_webhook_events_reach_metrics(redis_url) -> None:
    from fastapi.testclient import TestClient

    from labeling_backend.app import create_app

    s = Settings.from_env({}, redis_url=redis_url, model_version="test-v1", basic_auth_user=None,
                          basic_auth_pass=None, api_token=None)  # fmt: skip
    tasks, done = make_corrected_export(4, width=W, height=H)
    with TestClient(create_app(s)) as client:
        for t in tasks:
            annotation, body_task = event(t)
            body = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 9},
                "annotation": annotation,
                "task": body_task,
            }
            assert client.post("/webhook", json=body).status_code == 201
        assert client.app.state.backend.quality.drain()
        text = client.get("/metrics").text
    assert sample(text, "groundlabel_quality_events_total", outcome="measured") == 4
    kept = sum(sample(text, "groundlabel_quality_regions_total", project="9", label=la, change="kept")
               for la in ("cat", "dog", "person"))  # fmt: skip
    assert kept == done["kept"]
