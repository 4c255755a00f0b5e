"""The training job: a Label Studio project's annotations → export → a trained version → model store.

A project with referring expressions is exported as RefCOCO and fine-tunes LAVT; one without (no
TextArea, or no text in it) is exported as COCO and distils GEM's CLIP on its images
(:mod:`workers.training.gem`, ``groundlabel distill``'s code), scored on its masks.

:func:`run_training` is the body of the ``train`` queue's job (``groundlabel worker --queues train``
gives it to :func:`workers.jobs.run_training`); it composes the exporters (the same code as ``groundlabel
export --format refcoco``) with the workers' fine-tuning (:mod:`workers.training.lavt`, built on
``groundlabel train-lavt``'s training loop), which is why it lives with the composition roots. Its
progress goes to the worker's log (progress bars, one line per epoch) and to the project's training status
on Redis (:mod:`groundlabel.training_queue`), read by the backend's ``/job_status`` and ``/metrics``. A job
that fails leaves the project's promoted version as it was; the failure callback records the reason.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore
from groundlabel.protocol import TrainPayload
from groundlabel.settings import Settings
from groundlabel_cli.splits import annotation_count, split_coco_images

#: Named here too, for the training job's callers: the annotations counted, the split by image.
__all__ = ["annotation_count", "split_coco_images"]

log = logging.getLogger("groundlabel.training")

#: Where the exported dataset goes inside the job's scratch folder.
DATASET_DIR = "dataset"


def export_project(
    project: str,
    settings: Settings,
    out: Path,
    *,
    label_studio_url: str | None = None,
    on_read: Callable[[], None] | None = None,
) -> tuple[str, int, dict[str, Any], str | None]:
    """Export the project's annotations split by image: ``(kind, annotations, summary, label config)``.

    Label Studio is ``LABEL_STUDIO_URL``, else ``label_studio_url`` (the one its ``/setup`` named) only on
    a host listed by name in ``GROUNDLABEL_ALLOWED_HOSTS`` (:meth:`FetchSettings.token_url`): the token is
    never sent to a host a request chose. ``on_read`` is called once Label Studio has answered for the
    project (it exists).

    ``kind`` says what the job trains: ``"lavt"`` when the project has referring expressions (a RefCOCO
    folder in ``out``), else ``"gem"`` (a COCO folder in ``out``: GEM's CLIP is distilled on the images
    and scored on the masks)."""
    from exporters.coco import export_coco
    from exporters.images import ImageResolver
    from exporters.labelstudio import fetch_project
    from exporters.refcoco import export_refcoco
    from groundlabel.spec import read_spec

    fetch = settings.fetch
    url = fetch.token_url(label_studio_url) if fetch.api_key else None  # never a host a request chose
    if not url or not fetch.api_key:
        raise UserError(
            "the training worker reads the project from Label Studio: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY on it"
        )
    tasks, label_config, _ = fetch_project(int(project), url=url, api_key=fetch.api_key)
    if on_read is not None:
        on_read()
    count = annotation_count(tasks)
    if not count:
        raise UserError(f"project {project} has no annotations to train on")
    holdout = settings.training.holdout

    def resolver() -> ImageResolver:
        return ImageResolver(
            images_root=fetch.local_files_root,
            label_studio_url=url,
            api_key=fetch.api_key,
            allowed_hosts=fetch.allowed_hosts,
        )

    spec = read_spec(label_config, settings) if label_config else None
    if spec is None or spec.text_name:  # a TextArea: the expressions train LAVT, if there are any
        summary = export_refcoco(
            tasks,
            out,
            label_config=label_config,
            fractions=(1.0 - holdout, holdout, 0.0, 0.0),
            seed=settings.training.seed,
            resolver=resolver(),
        )
        if summary.exported.get("refs", 0):
            return "lavt", count, summary.to_dict(), label_config
        shutil.rmtree(out, ignore_errors=True)
        log.info("project %s: no referring expression among %d annotations: distilling GEM", project, count)
    summary = export_coco(tasks, out, label_config=label_config, resolver=resolver())
    return "gem", count, summary.to_dict(), label_config


def train_project(
    payload: TrainPayload,
    settings: Settings,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_read: Callable[[], None] | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """The whole training job for ``payload.project``; returns its outcome as JSON (``on_read``: see
    :func:`export_project`)."""
    from workers.training.lavt import Recipe, fine_tune_project

    if not settings.training.model_store:
        raise UserError("training needs a model store: set GROUNDLABEL_MODEL_STORE on the training worker")
    store = ModelStore.from_url(settings.training.model_store, settings.training.s3)
    report = on_progress or (lambda _update: None)
    scratch = Path(tempfile.mkdtemp(prefix=f"groundlabel-train-{payload.project}-"))
    recipe = Recipe.from_settings(settings.training)
    try:
        calibration = calibrate_first(payload, settings, store, report)
        report({"stage": "exporting"})
        kind, count, summary, label_config = export_project(
            payload.project,
            settings,
            scratch / DATASET_DIR,
            label_studio_url=payload.label_studio_url,
            on_read=on_read,
        )
        log.info("project %s: exported %s (%s)", payload.project, summary.get("exported"), kind)
        report({"stage": "exported", "kind": kind})
        served = store.promoted(payload.project)
        served_calibration = store.calibration(served) if served and served.kind == "calibration" else None
        if kind == "lavt":
            outcome: Any = fine_tune_project(
                scratch / DATASET_DIR,
                store=store,
                project=payload.project,
                annotation_count=count,
                engines=settings.engines,
                recipe=recipe,
                work_dir=scratch,
                on_progress=report,
                progress_bar=progress_bar,
            )
        else:
            from exporters.geometry import decode_segmentation
            from workers.training.gem import distill_project, mask_classes

            data = scratch / DATASET_DIR
            splits = split_coco_images(data, settings.training.holdout, settings.training.seed)
            compare = None
            if served_calibration is not None:  # the fine-tune starts from the calibrated settings
                from groundlabel.spec import read_spec
                from groundlabel_cli.calibrate import calibrated_iou, read_samples

                spec, samples = read_spec(label_config or "", settings), read_samples(data, splits)

                def compare(gem: Any) -> float:
                    return calibrated_iou(spec, samples, served_calibration, gem)

            outcome = distill_project(
                scratch / DATASET_DIR,
                store=store,
                project=payload.project,
                annotation_count=count,
                classes=mask_classes(label_config),
                engines=settings.engines,
                recipe=recipe,
                splits=splits,
                decode=decode_segmentation,
                work_dir=scratch,
                on_progress=report,
                progress_bar=progress_bar,
                calibrated=compare,
            )
        if served_calibration is not None and outcome.promoted and kind == "gem":  # calibrated as before
            calibration = recalibrated(store, payload.project, served_calibration, outcome, count)
        out = {**outcome.to_dict(), "annotation_count": count, "splits": summary.get("splits", {})}
        return {**out, "calibration": calibration}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def calibrate_first(
    payload: TrainPayload, settings: Settings, store: ModelStore, report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The training job's first, cheap step: ``groundlabel calibrate`` of the project
    (:func:`groundlabel_cli.calibrate.calibrate_project`), stored and promoted by its own rule. A calibration
    that cannot run (no mask label, too few images) is reported and the training goes on."""
    from groundlabel_cli.calibrate import calibrate_project
    from workers import engines

    report({"stage": "calibrating"})
    previous = engines.settings()
    if previous is not settings:
        engines.configure(settings)
    try:
        outcome = calibrate_project(
            payload.project, settings, store, label_studio_url=payload.label_studio_url
        )
    except Exception as exc:  # an extra step: the training itself says what is wrong with the project
        log.warning("project %s: no calibration: %s", payload.project, exc)
        return {"error": str(exc)}
    finally:
        if previous is not settings:
            engines.configure(previous)
    report(
        {
            "stage": "calibrated",
            "calibration_version": outcome.version,
            "calibration_promoted": outcome.promoted,
        }
    )
    return outcome.to_dict()


def recalibrated(
    store: ModelStore, project: str, calibration: Any, outcome: Any, count: int
) -> dict[str, Any]:
    """After a distilled GEM that beat the current one under the calibrated settings is promoted: the same
    choices stored as a calibration over it, and promoted, so the project keeps its calibrated settings."""
    import json

    from groundlabel.calibration import Calibration

    again = Calibration(list(calibration.choices), trained=outcome.version)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "calibration.json"
        file.write_text(json.dumps(again.to_dict()), encoding="utf-8")
        version = store.add(
            project=project,
            kind="calibration",
            variant="gem",
            weights=file,
            parent=outcome.version,
            annotation_count=count,
            config=again.to_dict(),
            metrics={
                "base": {"IoU": outcome.base.get("calibrated_IoU")},
                "new": {"IoU": outcome.new.get("calibrated_IoU")},
            },
        )
    store.promote(project, version.name, f"the calibrated settings over {outcome.version}")
    return {"version": version.name, "promoted": True, "trained": outcome.version}


def run_training(payload: dict[str, Any]) -> dict[str, Any]:
    """The RQ job of the ``train`` queue: :func:`train_project` with progress written to Redis."""
    from rq import get_current_job

    from groundlabel.training_queue import remember_project, write_status
    from workers import engines

    request = TrainPayload.from_dict(payload)
    job = get_current_job()

    def report(update: dict[str, Any]) -> None:
        if job is not None:
            try:
                write_status(job.connection, request.project, job=job.id, state="started", **update)
            except Exception as exc:  # progress is informative: a Redis hiccup must not fail the job
                log.warning("training progress not recorded: %s", exc)

    def found() -> None:  # Label Studio answered for the project: /metrics may show its series
        if job is not None:
            try:
                remember_project(job.connection, request.project)
            except Exception as exc:
                log.warning("project %s not recorded as known: %s", request.project, exc)

    return train_project(request, engines.settings(), on_progress=report, on_read=found)
