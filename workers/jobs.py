"""The job function: a chunk of tasks in, one Label Studio prediction per task out.

:func:`run_prediction_job` is the whole job and needs no queue: RQ workers call :func:`run_job` with the
JSON payload (the result cache is written by the queue's success callback, not here), the in-process
runner's children call :func:`run_json_timed`. Nothing heavy is imported at module level, so a process can
name these functions without importing torch. The payload and result shapes are
:mod:`groundlabel.protocol`'s; the regions come from :mod:`workers.pipeline`.

What a task gets:

- **Class prompts (GEM)**, the default: every label's prompts (``predicted_values`` synonyms) go through
  GEM as one batch for all the job's tasks; the score maps become regions for every control.
- **Another engine of the registry** (:mod:`workers.registry`), for the controls whose tag names it
  (``engine="sam3"``), or all under ``GROUNDLABEL_ENGINE``: an engine answering instances (SAM 3) gives
  every instance of each class prompt, and of a typed phrase, its own region with its own score
  (:func:`workers.pipeline.prompt_regions`, :func:`workers.pipeline.text_regions`).
- **A referring expression (LAVT)**: when the request's context holds a TextArea text, or the task's data
  holds one under the TextArea's ``value="$key"``. Without a configured LAVT model
  (``GROUNDLABEL_LAVT_CHECKPOINT``), GEM grounds the expression instead, and the prediction says so in its
  model version (``gem-...-expressions``).
- **Clicks and boxes** (interactive key points / rectangles with a label): see
  :func:`workers.pipeline.click_regions`. The controls the user clicked with get no regions of their own.
  With a promptable SAM configured (``GROUNDLABEL_SAM_MODEL``) they are its point and box prompts;
  ``refine=sam`` (``GROUNDLABEL_GEM_REFINE``, ``GROUNDLABEL_LAVT_REFINE``) sharpens GEM's and LAVT's masks.

A job's ``deadline`` (Unix time, set by the backend: when its request stops waiting, and before RQ's job
timeout) bounds every image download; a task whose image is not fetched by then fails alone (nothing is
cached, a later request tries it again), so a job never outlives its request by more than its model run.

A failing task gets ``{"result": [], "score": 0.0, "model_version": ..., "error": reason}``; the others
still get their predictions. Errors outside any task (the model cannot be loaded) raise, so that RQ
retries the job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from groundlabel import versions
from groundlabel.errors import UserError
from groundlabel.ls_format import context_clicks, context_text, context_text_controls, text_entries
from groundlabel.protocol import JobPayload, failed_prediction, prediction
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec

log = logging.getLogger(__name__)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _load_image(
    task: Mapping[str, Any], spec: LabelingSpec, label_studio_url: str | None, deadline: float | None = None
) -> Any:
    from workers import engines
    from workers.fetch import fetch_image

    url = (task.get("data") or {}).get(spec.image_key)
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"task {task.get('id')} has no {spec.image_key!r} image URL in its data")
    return fetch_image(
        url,
        task_id=task.get("id"),
        settings=engines.fetch_settings(),
        label_studio_url=label_studio_url,
        deadline=deadline,
    )


def _task_expression(task: Mapping[str, Any], spec: LabelingSpec, context: Any) -> str | None:
    text = context_text(context)
    if text or not spec.text_key:
        return text
    value = (task.get("data") or {}).get(spec.text_key)
    return " ".join(text_entries({"text": value})) or None


def run_prediction_job(payload: JobPayload) -> list[dict[str, Any]]:
    """One prediction per task of ``payload`` (see the module docstring); one bad task fails alone."""
    from workers import engines, pipeline

    tasks, spec, context = payload.tasks, payload.spec, payload.context
    gem = engines.get_gem_engine(payload.project)  # raises (job retried) when it cannot be loaded
    named = payload.model_version  # the operator's one name for every prediction, if any

    def answer(regions: pipeline.ImageRegions) -> dict[str, Any]:
        return prediction(regions.results, regions.score, named or regions.model_version, regions.meta)

    def failed(exc: BaseException) -> dict[str, Any]:
        return failed_prediction(_describe(exc), named or gem.model_version)

    out: list[dict[str, Any] | None] = [None] * len(tasks)
    images: dict[int, Any] = {}
    for i, task in enumerate(tasks):
        try:
            images[i] = _load_image(task, spec, payload.label_studio_url, payload.deadline)
        except Exception as exc:
            out[i] = failed(exc)

    clicks = context_clicks(context)
    excluded = {c.from_name for c in clicks if c.from_name} | context_text_controls(context)
    expressions = {i: _task_expression(tasks[i], spec, context) for i in images}
    project = payload.project
    calibrated = engines.project_calibration(project)
    chosen = calibrated[1].expressions if calibrated is not None else None  # the calibrated expression way
    wants_lavt = any(expressions.values()) and engines.lavt_enabled(project)
    wants_lavt = wants_lavt and (chosen is None or chosen.engine == "lavt")
    lavt = engines.get_lavt_engine(project) if wants_lavt else None
    if chosen is None:
        sharpen = engines.refiner("lavt" if lavt is not None else "gem")
    else:
        sharpen = engines.get_sam_engine() if chosen.sam else None
    stand_in = versions.stand_in(gem.model_version)
    outputs = spec.without(excluded)
    default = engines.default_engine()

    def engine_for(name: str) -> Any:
        return engines.get_engine(name, project)

    batch = [i for i in images if not expressions[i] and not clicks]
    for i in images:
        if i in batch:
            continue
        try:
            if expressions[i]:
                regions = pipeline.text_regions(
                    outputs,
                    images[i],
                    expressions[i],
                    engine_for,
                    default=default,
                    lavt=lavt,
                    stand_in_version=stand_in,
                    sam=sharpen,
                    threshold=chosen.threshold if chosen is not None else None,
                )
            else:
                regions = pipeline.click_regions(
                    spec, images[i], clicks, gem=gem, excluded=excluded, sam=engines.get_sam_engine()
                )
            out[i] = answer(regions)
        except Exception as exc:
            log.warning("task %s failed: %s", tasks[i].get("id"), _describe(exc))
            out[i] = failed(exc)

    if batch and calibrated is not None:  # the calibrated controls answer per label, the others as before
        found = _calibrated(outputs, [images[i] for i in batch], calibrated, engine_for, default, project)
    elif batch:
        found = pipeline.prompt_regions(
            outputs, [images[i] for i in batch], engine_for, default=default, sam=engines.refiner("gem")
        )
    if batch:
        for i, item in zip(batch, found, strict=True):
            out[i] = failed(item) if isinstance(item, Exception) else answer(item)
    return [o if o is not None else failed(UserError("no prediction was made")) for o in out]


def _calibrated(
    spec: LabelingSpec, images: list[Any], calibrated: tuple[str, Any], engine_for, default: str, project
) -> list[Any]:
    """Class prompts of a project served by a calibration (:func:`workers.calibration.calibrated_regions`)
    for the controls it chose for, the others through :func:`workers.pipeline.prompt_regions`."""
    from workers import engines, pipeline
    from workers.calibration import calibrated_regions, current_variant

    name, calibration = calibrated
    gem = engines.get_gem_engine(project)  # named like a trained version: -bf16 where GEM ran in bf16
    name = versions.with_precision(name, getattr(gem, "version_precision", "fp32"))
    chosen = {c.control for c in calibration.choices}
    own = spec.without({c.name for c in spec.controls if c.name not in chosen})
    rest = spec.without(chosen)
    refine = engines.settings().engines.gem_refine
    parts = []
    if own.controls:
        parts.append(
            calibrated_regions(
                own,
                images,
                calibration,
                lambda v: engines.variant_engine(v, project),
                current=lambda c: current_variant(c, default, refine),
                version=name,
                sam=engines.get_sam_engine(),
            )
        )
    if rest.controls:
        sam = engines.refiner("gem")
        parts.append(pipeline.prompt_regions(rest, images, engine_for, default=default, sam=sam))
    out: list[Any] = []
    for per_image in zip(*parts, strict=True):
        failed = [p for p in per_image if isinstance(p, Exception)]
        out.append(failed[0] if failed else pipeline.combine_regions(per_image))
    return out


def run_job(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The RQ job: :func:`run_prediction_job` on the JSON payload."""
    return run_prediction_job(JobPayload.from_dict(payload))


def run_json(text: str) -> str:
    """:func:`run_prediction_job` with the payload and the result as JSON text (the in-process runner)."""
    return json.dumps(run_job(json.loads(text)))


def run_json_timed(text: str) -> tuple[str, float]:
    """:func:`run_json` and the seconds the job itself took (the in-process runner reports them)."""
    start = time.perf_counter()
    out = run_json(text)
    return out, time.perf_counter() - start


#: The training job's body, given by the command that starts the worker (it composes the exporters with the
#: workers' fine-tuning, so it lives with the commands); :func:`run_training` runs it.
_training: list[Callable[[dict[str, Any]], dict[str, Any]]] = []


def provide_training(function: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Make ``function`` the body of :func:`run_training` in this process."""
    _training[:] = [function]


def run_training(payload: dict[str, Any]) -> dict[str, Any]:
    """The RQ job of the ``train`` queue (the protocol's ``TRAIN_FUNCTION``): the body that the worker's
    command provided (:func:`provide_training`)."""
    if not _training:
        raise RuntimeError("no training job in this process: start `groundlabel worker --queues train`")
    return _training[0](payload)


def init_process(settings: Settings) -> None:
    """Initialiser of an in-process worker child: the parent's settings, and logging like the parent's."""
    from workers import engines

    engines.configure(settings)
    logging.basicConfig(
        level=getattr(logging, settings.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def warm_up() -> str:
    """Load the configured engines in this process; returns their model versions."""
    from workers import engines

    return ", ".join(engines.load_all())
