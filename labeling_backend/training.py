"""The backend's side of training: start jobs, say how they go, and which trained version serves a project.

Training needs a model store (``GROUNDLABEL_MODEL_STORE``, read here without torch) and Redis, where the
jobs wait on the ``train`` queue for ``groundlabel worker --queues train``. Without either, a request to
train is answered with the reason and nothing else changes. The Redis layout of training jobs is
:mod:`groundlabel.training_queue`'s; the store's format is :mod:`groundlabel.model_store`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from prometheus_client.core import GaugeMetricFamily

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore, ModelVersion, StoreFileError, check_project, version_summary
from groundlabel.protocol import TrainPayload
from groundlabel.redaction import redact
from groundlabel.redis_queue import connect
from groundlabel.settings import Settings
from groundlabel.training_queue import (
    all_statuses,
    count_annotation,
    enqueue_training,
    job_status,
    known_projects,
)

log = logging.getLogger("groundlabel.backend")
T = TypeVar("T")


class TrainingUnavailable(UserError):
    """Training is not configured on this backend; the message says what is missing."""


class Training:
    """Training jobs and trained versions, for the endpoints (one per app)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ModelStore.from_settings(settings.training)
        redis_url = settings.queue.redis_url
        self.connection = connect(redis_url, timeout=settings.queue.redis_timeout) if redis_url else None

    def unavailable(self) -> str | None:
        """Why this backend cannot start training jobs, or None when it can."""
        if self.store is None:
            return "training is off: set GROUNDLABEL_MODEL_STORE on the backend and the training worker"
        if self.connection is None:
            return (
                "training jobs need Redis (REDIS_URL) and a training worker "
                "(groundlabel worker --queues train); this backend runs its jobs in-process"
            )
        return None

    def _redis(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            from groundlabel.protocol import QueueUnavailable

            where = redact(self.settings.queue.redis_url or "redis")
            raise QueueUnavailable(f"{what}: Redis at {where} is unreachable: {redact(str(exc))}") from exc

    # -- jobs ----------------------------------------------------------------------------------------

    def start(self, project: str, *, trigger: str, label_studio_url: str | None = None) -> dict[str, Any]:
        """Enqueue a training job for ``project`` (or find the one queued or running); answers at once."""
        reason = self.unavailable()
        if reason is not None:
            raise TrainingUnavailable(reason)
        project = check_project(project)
        payload = TrainPayload(project=project, label_studio_url=label_studio_url, trigger=trigger)
        job_id, created = self._redis(
            "starting a training job",
            enqueue_training,
            self.connection,
            payload,
            timeout=self.settings.training.timeout,
        )
        log.info(
            "training project %s: %s job %s (%s)",
            project,
            "queued" if created else "already has",
            job_id,
            trigger,
        )
        return {"job": job_id, "created": created, "project": project}

    def annotation_changed(
        self, project: str, *, label_studio_url: str | None = None
    ) -> dict[str, Any] | None:
        """Count an annotation event; start a job when ``GROUNDLABEL_TRAIN_EVERY`` of them have come."""
        every = self.settings.training.every
        if every <= 0 or self.unavailable() is not None or not project:
            return None
        project = check_project(project)
        if not self._redis("counting annotations", count_annotation, self.connection, project, every):
            return None
        return self.start(project, trigger=f"{every} annotations", label_studio_url=label_studio_url)

    def job_status(self, job_id: str) -> dict[str, Any] | None:
        """A training job's state and progress (None: no such training job)."""
        if self.connection is None:
            return None
        return self._redis("reading a training job", job_status, self.connection, job_id)

    # -- versions ------------------------------------------------------------------------------------

    def promoted(self, project: str | None) -> str | None:
        """The trained version ``project`` serves, or None (the base models); a broken store is logged."""
        return self._read_store(lambda store: store.promoted_name(project), project)

    def promoted_version(self, project: str | None) -> ModelVersion | None:
        """The record of the trained version ``project`` serves (its ``kind`` says which engine), or None;
        a broken store is logged."""
        return self._read_store(lambda store: store.promoted(project), project)

    def served_trained(self, project: str | None) -> ModelVersion | None:
        """The trained version under ``project``'s promoted calibration, or its promoted trained version
        (:meth:`ModelStore.served_trained`), or None; a broken store is logged."""
        return self._read_store(lambda store: store.served_trained(project), project)

    def _read_store(self, read: Callable[[ModelStore], T], project: str | None) -> T | None:
        """``read(store)`` for a project, or None without a store or project, or when the project's store
        files are broken (logged: the project is served by the base models)."""
        if self.store is None or not project:
            return None
        try:
            return read(self.store)
        except UserError as exc:
            log.warning("model store: %s; project %s is served by the base models", exc, project)
            return None

    def versions(self, project: str | None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """``(versions, errors)``: the trained versions of ``project`` (every project's when None), oldest
        first. With a project, a broken store file raises :class:`StoreFileError`; across projects, a
        project whose files are broken is left out and named in ``errors`` (``{"project", "error"}``)."""
        if self.store is None:
            return [], []
        projects = [check_project(project)] if project else self.store.projects()
        out: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for p in projects:
            try:
                promoted = self.store.promoted_name(p)
                out += [version_summary(v, promoted) for v in self.store.versions(p)]
            except StoreFileError as exc:
                if project:
                    raise
                log.warning("model store: %s; project %s left out of /versions", exc, p)
                errors.append({"project": p, "error": str(exc)})
        return out, errors

    def known_projects(self) -> set[str]:
        """Projects that exist for certain: read from Label Studio by a training job, or holding versions
        in the model store. Only these get training series in ``/metrics``."""
        known: set[str] = set()
        if self.connection is not None:
            known |= known_projects(self.connection)
        if self.store is not None:
            try:
                known |= set(self.store.projects())
            except UserError as exc:
                log.debug("model store projects unavailable: %s", exc)
        return known

    # -- monitoring ----------------------------------------------------------------------------------

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        """Gauges per project from the training statuses on Redis, for the projects known to exist
        (:meth:`known_projects`): a caller cannot add series by asking to train projects that do not."""

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"groundlabel_training_{name}", text, labels=["project"])

        running = gauge("running", "1 while the project's training job is queued or running")
        epoch = gauge("epoch", "Epochs done by the latest job")
        epochs = gauge("epochs", "Epochs the latest job runs")
        loss = gauge("loss", "Training loss of the last epoch")
        failed = gauge("failed", "1 when the latest job failed")
        heldout = GaugeMetricFamily(
            "groundlabel_training_heldout_oiou",
            "Held-out oIoU of the current model (model=current) and of the newly trained one (model=new)",
            labels=["project", "model"],
        )
        heldout_miou = GaugeMetricFamily(
            "groundlabel_training_heldout_miou",
            "Held-out mIoU (percent) of the current GEM (model=current) and of the distilled one (model=new)",
            labels=["project", "model"],
        )
        promoted = gauge("promoted", "1 when the latest job's version was promoted")
        statuses: dict[str, dict[str, Any]] = {}
        if self.connection is not None:
            try:
                known = self.known_projects()
                found = all_statuses(self.connection)
                statuses = {p: s for p, s in found.items() if p in known and isinstance(s, dict)}
            except redis.RedisError as exc:
                log.debug("training statuses unavailable: %s", exc)
        for project, status in sorted(statuses.items(), key=lambda item: (len(item[0]), item[0])):
            state = status.get("state")
            running.add_metric([project], 1 if state in ("queued", "started") else 0)
            failed.add_metric([project], 1 if state == "failed" else 0)
            for family, key in ((epoch, "epoch"), (epochs, "epochs"), (loss, "loss")):
                if isinstance(status.get(key), int | float):
                    family.add_metric([project], float(status[key]))
            for model, key in (("current", "base"), ("new", "new" if "new" in status else "epoch_heldout")):
                value = (status.get(key) or {}).get("oIoU") if isinstance(status.get(key), dict) else None
                if value is not None:  # "new" follows the epochs while the job trains
                    heldout.add_metric([project, model], float(value))
            if status.get("kind") == "gem":
                for model, key in (("current", "base"), ("new", "new")):
                    value = (status.get(key) or {}).get("mIoU") if isinstance(status.get(key), dict) else None
                    if value is not None:
                        heldout_miou.add_metric([project, model], float(value))
            if "promoted" in status:
                promoted.add_metric([project], 1 if status["promoted"] else 0)
        yield from (running, epoch, epochs, loss, failed, heldout, heldout_miou, promoted)

    def close(self) -> None:
        """Close the Redis connection."""
        if self.connection is not None:
            self.connection.close()
