"""Job functions: a chunk of tasks in, one Label Studio prediction per task out.

:func:`predict_tasks` is the whole job and needs no queue: RQ workers call :func:`run_job` (which also
fills the result cache in Redis), the backend's in-process children call :func:`run_json`. Nothing heavy is
imported at module level, so the backend can reference these functions without importing torch.

What a task gets:

- **Class prompts (GEM)**, the default: every label's prompts (``predicted_values`` synonyms) go through
  GEM as one batch for all the job's tasks; the score maps become regions for every control.
- **A referring expression (LAVT)**: when the request's context holds a TextArea text, or the task's data
  holds one under the TextArea's ``value="$key"``. The expression's mask becomes one region per control,
  labelled with the control's label named in the expression, else its first label. Without a configured
  LAVT model (``GROUNDLABEL_LAVT_CHECKPOINT``), GEM grounds the expression instead.
- **Clicks and boxes** (interactive key points / rectangles with a label): GEM scores that label; the
  connected part of the thresholded map under each positive click (inside each box) is kept, negative
  clicks remove theirs. The controls the user clicked with get no regions of their own.

A failing task gets ``{"result": [], "score": 0.0, "model_version": ..., "error": reason}``; the others
still get their predictions. Errors outside any task (the model cannot be loaded) raise, so that RQ
retries the job.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # used when the regions package does not define its own default
LAVT_MASK_THRESHOLD = 0.5


# -- helpers -----------------------------------------------------------------------------------------


def _error(reason: str, model_version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": model_version, "error": reason}


def _describe(exc: BaseException) -> str:
    from groundlabel.errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


_fetch_settings: Any = None


def _load_image(task: Mapping[str, Any], spec: Any, label_studio_url: str | None) -> Any:
    global _fetch_settings
    from groundlabel.errors import UserError
    from workers.fetch import FetchSettings, fetch_image

    data = task.get("data") or {}
    url = data.get(spec.image_key)
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"task {task.get('id')} has no {spec.image_key!r} image URL in its data")
    if _fetch_settings is None:
        _fetch_settings = FetchSettings.from_env()
    return fetch_image(
        url, task_id=task.get("id"), settings=_fetch_settings, label_studio_url=label_studio_url
    )


def _context_regions(context: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not context:
        return []
    return [r for r in (context.get("result") or []) if isinstance(r, dict)]


def _context_text(context: Mapping[str, Any] | None) -> str | None:
    for region in _context_regions(context):
        if region.get("type") != "textarea":
            continue
        text = (region.get("value") or {}).get("text")
        if isinstance(text, list):
            text = " ".join(str(t) for t in text if str(t).strip())
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _clicks(context: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for region in _context_regions(context):
        kind = region.get("type")
        if kind not in ("keypointlabels", "rectanglelabels"):
            continue
        value = region.get("value") or {}
        labels = value.get(kind) or []
        if not labels:
            continue
        out.append(
            {
                "kind": kind,
                "label": str(labels[0]),
                "from_name": region.get("from_name"),
                "x": float(value.get("x", 0.0)),
                "y": float(value.get("y", 0.0)),
                "width": float(value.get("width", 0.0)),
                "height": float(value.get("height", 0.0)),
                "positive": region.get("is_positive", True) is not False,
            }
        )
    return out


def _task_expression(task: Mapping[str, Any], spec: Any, context: Mapping[str, Any] | None) -> str | None:
    text = _context_text(context)
    if text:
        return text
    if spec.text_key:
        value = (task.get("data") or {}).get(spec.text_key)
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _threshold(control: Any) -> float:
    try:
        from workers import regions

        default = float(getattr(regions, "DEFAULT_THRESHOLD", DEFAULT_THRESHOLD))
    except ImportError:
        default = DEFAULT_THRESHOLD
    return control.option_float("model_score_threshold", default)


def _label_for_expression(control: Any, expression: str) -> str:
    words = set(re.findall(r"[a-z0-9]+", expression.lower()))
    for label in control.labels:
        names = [label, *control.prompts.get(label, [])]
        for name in names:
            tokens = re.findall(r"[a-z0-9]+", name.lower())
            if tokens and all(t in words for t in tokens):
                return label
    return control.labels[0]


# -- the three ways to predict -----------------------------------------------------------------------


def _gem_batch(engine: Any, spec: Any, images: Sequence[Any], excluded: set[str]) -> list[tuple[list, float]]:
    """Class prompts for a batch of images → (results, score) per image."""
    from labeling_backend.label_config import LabelingSpec
    from workers.regions import predict_regions

    prompts = spec.all_prompts()
    if excluded:
        spec = LabelingSpec(
            spec.image_name,
            spec.image_key,
            [c for c in spec.controls if c.name not in excluded],
            spec.text_name,
            spec.text_key,
        )
    heatmaps = engine.heatmaps(list(images), prompts)
    out = []
    for image, maps in zip(images, heatmaps, strict=True):
        scores = {p: maps[k] for k, p in enumerate(prompts)}
        out.append(predict_regions(spec, scores, width=image.width, height=image.height))
    return out


def _mask_regions(
    spec: Any, mask: Any, score_map: Any, image: Any, label_of, excluded: set[str]
) -> tuple[list, float]:
    from workers.regions import regions_from_mask

    results: list[dict[str, Any]] = []
    if not mask.any():
        return results, 0.0
    for control in spec.controls:
        if control.name in excluded:
            continue
        results.extend(
            regions_from_mask(
                control, label_of(control), mask, score_map, width=image.width, height=image.height
            )
        )
    score = float(score_map[mask].mean()) if score_map is not None else 1.0
    return results, score


def _expression_prediction(
    spec: Any, image: Any, expression: str, excluded: set[str], lavt: Any, gem: Any
) -> tuple[list, float, dict[str, Any]]:
    import numpy as np

    meta: dict[str, Any] = {}
    if lavt is not None:
        ((prob, meta),) = lavt.probabilities([image], [expression])
        prob = np.asarray(prob, dtype=np.float32)
        mask = prob >= LAVT_MASK_THRESHOLD
    else:
        (maps,) = gem.heatmaps([image], [expression])
        prob = maps[0]
        thresholds = [_threshold(c) for c in spec.controls] or [DEFAULT_THRESHOLD]
        mask = prob >= min(thresholds)
        meta = {"engine": "gem"}
    results, score = _mask_regions(
        spec, mask, prob, image, lambda c: _label_for_expression(c, expression), excluded
    )
    return results, score, dict(meta or {})


def _click_prediction(
    spec: Any, image: Any, clicks: list[dict[str, Any]], excluded: set[str], gem: Any
) -> tuple[list, float]:
    import numpy as np

    from groundlabel.errors import UserError

    h, w = image.height, image.width
    by_label: dict[str, list[dict[str, Any]]] = {}
    for click in clicks:
        by_label.setdefault(click["label"], []).append(click)
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    for label, label_clicks in by_label.items():
        prompts: list[str] = []
        threshold = DEFAULT_THRESHOLD
        for control in spec.controls:
            if label in control.labels:
                prompts.extend(p for p in control.prompts[label] if p not in prompts)
                threshold = min(threshold, _threshold(control)) if prompts else _threshold(control)
        if not prompts:
            raise UserError(f"the clicked label {label!r} is not a label of any control in the label config")
        (maps,) = gem.heatmaps([image], prompts)
        score_map = maps.max(axis=0)
        mask = np.zeros((h, w), dtype=bool)
        for click in label_clicks:
            part = _click_mask(score_map, click, threshold)
            mask = mask | part if click["positive"] else mask & ~part
        outputs = [c for c in spec.controls if c.name not in excluded]
        labelled = [c for c in outputs if label in c.labels] or outputs
        sub_spec_controls = {c.name for c in spec.controls} - {c.name for c in labelled}
        res, score = _mask_regions(
            spec,
            mask,
            score_map,
            image,
            lambda c, lab=label: lab if lab in c.labels else c.labels[0],
            excluded | sub_spec_controls,
        )
        results.extend(res)
        if res:
            scores.append(score)
    return results, float(np.mean(scores)) if scores else 0.0


def _click_mask(score_map: Any, click: dict[str, Any], threshold: float) -> Any:
    """The part of the thresholded score map that a click or box selects."""
    import cv2
    import numpy as np

    h, w = score_map.shape
    if click["kind"] == "keypointlabels":
        px = min(max(int(click["x"] / 100.0 * w), 0), w - 1)
        py = min(max(int(click["y"] / 100.0 * h), 0), h - 1)
        at = float(score_map[py, px])
        if at <= 0:
            return np.zeros((h, w), dtype=bool)
        binary = (score_map >= min(threshold, 0.5 * at)).astype(np.uint8)
        _, labels = cv2.connectedComponents(binary, connectivity=8)
        return labels == labels[py, px]
    x0 = min(max(int(click["x"] / 100.0 * w), 0), w - 1)
    y0 = min(max(int(click["y"] / 100.0 * h), 0), h - 1)
    x1 = min(max(int(np.ceil((click["x"] + click["width"]) / 100.0 * w)), x0 + 1), w)
    y1 = min(max(int(np.ceil((click["y"] + click["height"]) / 100.0 * h)), y0 + 1), h)
    inside = score_map[y0:y1, x0:x1]
    peak = float(inside.max()) if inside.size else 0.0
    mask = np.zeros((h, w), dtype=bool)
    if peak > 0:
        mask[y0:y1, x0:x1] = inside >= min(threshold, 0.5 * peak)
    return mask


# -- the job -----------------------------------------------------------------------------------------


def predict_tasks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One prediction per task of ``payload`` (see the module docstring); one bad task fails alone."""
    from labeling_backend.label_config import LabelingSpec
    from workers import engines

    tasks = list(payload.get("tasks") or [])
    spec = LabelingSpec.from_dict(payload["spec"])
    context = payload.get("context") or None
    label_studio_url = payload.get("label_studio_url")
    announced = payload.get("model_version")

    gem = engines.get_gem_engine()  # raises (job retried) when the model cannot be loaded
    model_version = announced or gem.model_version
    out: list[dict[str, Any] | None] = [None] * len(tasks)

    images: dict[int, Any] = {}
    for i, task in enumerate(tasks):
        try:
            images[i] = _load_image(task, spec, label_studio_url)
        except Exception as exc:
            out[i] = _error(_describe(exc), model_version)

    clicks = _clicks(context)
    excluded = {c["from_name"] for c in clicks if c.get("from_name")}
    if _context_text(context):
        excluded |= {r.get("from_name") for r in _context_regions(context) if r.get("type") == "textarea"}
    expressions = {i: _task_expression(tasks[i], spec, context) for i in images}
    lavt = engines.get_lavt_engine() if any(expressions.values()) and engines.lavt_enabled() else None

    gem_batch = [i for i in images if not expressions[i] and not clicks]
    for i in images:
        if i in gem_batch:
            continue
        try:
            if expressions[i]:
                results, score, meta = _expression_prediction(
                    spec, images[i], expressions[i], excluded, lavt, gem
                )
                answered_by = lavt.model_version if lavt is not None else model_version
                out[i] = {"result": results, "score": score, "model_version": answered_by}
                if meta.get("truncated"):
                    out[i]["meta"] = {"truncated": True, "tokens": meta.get("tokens")}
            else:
                results, score = _click_prediction(spec, images[i], clicks, excluded, gem)
                out[i] = {"result": results, "score": score, "model_version": model_version}
        except Exception as exc:
            log.warning("task %s failed: %s", tasks[i].get("id"), _describe(exc))
            out[i] = _error(_describe(exc), model_version)

    if gem_batch:
        try:
            batch = _gem_batch(gem, spec, [images[i] for i in gem_batch], excluded)
        except Exception as exc:  # isolate the task that breaks the batch: run them one by one
            log.warning(
                "batch of %d tasks failed (%s); running them one by one", len(gem_batch), _describe(exc)
            )
            batch = []
            for i in gem_batch:
                try:
                    batch.append(_gem_batch(gem, spec, [images[i]], excluded)[0])
                except Exception as one_exc:
                    batch.append(one_exc)
        for i, item in zip(gem_batch, batch, strict=True):
            if isinstance(item, BaseException):
                out[i] = _error(_describe(item), model_version)
            else:
                results, score = item
                out[i] = {"result": results, "score": float(score), "model_version": model_version}
    return [o if o is not None else _error("no prediction was made", model_version) for o in out]


def run_job(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The RQ job: :func:`predict_tasks`, then the per-task result cache and pending markers in Redis."""
    predictions = predict_tasks(payload)
    cache = payload.get("cache") or {}
    keys = cache.get("keys") or []
    if keys:
        from rq import get_current_job

        from labeling_backend.queue import PENDING_PREFIX, RESULT_PREFIX

        job = get_current_job()
        if job is not None:
            ttl = int(cache.get("ttl") or 86400)
            with job.connection.pipeline() as pipe:
                for key, prediction in zip(keys, predictions, strict=False):
                    if not prediction.get("error"):
                        pipe.set(RESULT_PREFIX + key, json.dumps(prediction), ex=ttl)
                    pipe.delete(PENDING_PREFIX + key)
                pipe.execute()
    return predictions


def run_json(text: str) -> str:
    """:func:`predict_tasks` with the payload and the result as JSON text (the in-process pool)."""
    return json.dumps(predict_tasks(json.loads(text)))


def init_process() -> None:
    """Initialiser of an in-process worker child: logging like the parent's."""
    level = os.environ.get("GROUNDLABEL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def warm_up() -> str:
    """Load the configured engines in this process; returns their model versions."""
    from workers import engines

    return ", ".join(engines.load_all())
