"""The one road from decoded images to Label Studio regions, for the jobs and ``groundlabel predict``.

The ways in, each a function, choose by what an engine answers (:mod:`workers.registry`), never its name:

- :func:`prompt_regions`: every control's class prompts through its engine. Score maps
  (:func:`class_prompt_regions`: every label's prompts, its ``predicted_values`` synonyms sharing the
  label's probability, as one batch; a batch that fails is run again one image at a time, so that one bad
  image fails alone; each control thresholds the maps at its own threshold,
  :func:`workers.regions.control_threshold`), or instances (:func:`instance_regions`: one region each).
- :func:`text_regions`: a typed phrase: instances of it (:func:`phrase_regions`), or a referring
  expression through LAVT, or a score-map engine standing in for it (:func:`expression_regions`); the mask
  becomes one region per control, labelled with the control's label that the expression names.
- :func:`click_regions`: interactive key points and boxes: a promptable SAM's point and box prompts when
  one is configured; else GEM scores the clicked label and the part of its thresholded map under each
  positive click (inside each box) is kept, and a negative click carves out the part of that mask nearer to
  it than to any positive click (:func:`clicks_mask`).

Each returns :class:`ImageRegions`; the model version it carries is the engine's that produced it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.ls_format import Click
from groundlabel.spec import ControlSpec, LabelingSpec
from groundlabel.versions import combined, refined
from workers.regions import (
    DEFAULT_THRESHOLD,
    control_model,
    control_threshold,
    prediction_score,
    regions_from_mask,
    regions_from_scores,
    working_size,
)
from workers.regions.geometry import find_components
from workers.registry import INSTANCES, get_entry

log = logging.getLogger(__name__)

#: LAVT's foreground probability threshold (its official evaluation's 0.5 on the softmax).
LAVT_MASK_THRESHOLD = 0.5


@dataclass
class ImageRegions:
    """One image's regions, their score, the engine that answered, and its score maps when it made some."""

    results: list[dict[str, Any]]
    score: float
    model_version: str
    meta: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, np.ndarray] | None = None  # prompt -> score map (class prompts only)


def prompt_groups(spec: LabelingSpec) -> tuple[list[str], list[str]]:
    """The spec's distinct prompts, and per prompt the label it belongs to (its first one)."""
    prompts = spec.all_prompts()
    group: dict[str, str] = {}
    for control in spec.controls:
        for label in control.labels:
            for prompt in control.prompts[label]:
                group.setdefault(prompt, f"{control.name}\x00{label}")
    return prompts, [group[p] for p in prompts]


def class_prompt_regions(
    gem: Any,
    spec: LabelingSpec,
    images: Sequence[Any],
    *,
    threshold: float | None = None,
    sam: Any = None,
    keep_maps: bool = False,
) -> list[ImageRegions | Exception]:
    """Regions of every control for each image from the spec's class prompts; an image that fails gets
    its exception instead. ``threshold`` is the default for controls without ``model_score_threshold``.
    ``sam``: a promptable SAM that sharpens each label's mask first (``refine=sam``, :func:`sam_regions`).

    Memory stays bounded whatever the images' size: GEM's maps are upsampled only to the regions'
    working size (:func:`workers.regions.working_size`, at most 2048 px a side), and the images go
    through GEM in groups whose maps fit :data:`MAP_BUDGET_BYTES` (one image at a time when they are
    large), each image's maps read one prompt at a time (:class:`PromptMaps`) and dropped once it has its
    regions (kept on the result, for overlays, with ``keep_maps``)."""
    prompts, groups = prompt_groups(spec)
    images = list(images)
    out: list[ImageRegions | Exception] = []
    for group in _map_groups(images, len(prompts)):
        out.extend(_class_prompt_group(gem, spec, group, prompts, groups, threshold, sam, keep_maps))
    return out


class PromptMaps(Mapping[str, np.ndarray]):
    """Prompt → score map over an engine's maps for one image (a sequence in prompt order); lazy maps
    (:class:`workers.models.gem.engine.UpsampledMaps`) are upsampled when a map is read."""

    def __init__(self, prompts: Sequence[str], maps: Sequence[np.ndarray]) -> None:
        self._where = {p: i for i, p in enumerate(prompts)}
        self._maps = maps

    def __getitem__(self, prompt: str) -> np.ndarray:
        return np.asarray(self._maps[self._where[prompt]], dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


#: The most bytes of float32 score maps that :func:`class_prompt_regions` holds at once (one image's
#: maps may exceed it alone: 20 prompts at 2048x2048 take 335 MB).
MAP_BUDGET_BYTES = 256 * 2**20


def _map_groups(images: list[Any], n_prompts: int) -> list[list[Any]]:
    """Consecutive images in groups whose working-size maps fit :data:`MAP_BUDGET_BYTES` together."""
    out: list[list[Any]] = []
    used = 0
    for image in images:
        w, h = working_size(image.width, image.height)
        cost = 4 * max(n_prompts, 1) * w * h
        if out and used + cost <= MAP_BUDGET_BYTES:
            out[-1].append(image)
            used += cost
        else:
            out.append([image])
            used = cost
    return out


def _class_prompt_group(
    gem: Any,
    spec: LabelingSpec,
    images: list[Any],
    prompts: list[str],
    groups: list[str],
    threshold: float | None,
    sam: Any,
    keep_maps: bool,
) -> list[ImageRegions | Exception]:
    """:func:`class_prompt_regions` of one group of images (GEM runs them as one batch)."""
    sizes = [working_size(im.width, im.height) for im in images]
    try:
        maps: list[Any] = list(gem.heatmaps(images, prompts, groups=groups, sizes=sizes, lazy=True))
    except Exception as exc:  # isolate the image that breaks the batch: run them one by one
        if len(images) == 1:
            return [exc]
        log.warning("batch of %d images failed (%s); running them one by one", len(images), exc)
        maps = []
        for image, size in zip(images, sizes, strict=True):
            try:
                maps.append(gem.heatmaps([image], prompts, groups=groups, sizes=[size], lazy=True)[0])
            except Exception as one_exc:
                maps.append(one_exc)
    out: list[ImageRegions | Exception] = []
    for k, image in enumerate(images):
        image_maps, maps[k] = maps[k], None  # each image's maps are dropped once it has its regions
        if isinstance(image_maps, Exception):
            out.append(image_maps)
            continue
        scores = PromptMaps(prompts, image_maps)
        try:
            if sam is None:
                results, score = regions_from_scores(
                    spec, scores, width=image.width, height=image.height, threshold=threshold
                )
            else:
                results, score = sam_regions(spec, scores, image, sam, threshold=threshold)
        except Exception as exc:
            out.append(exc)
            continue
        version = gem.model_version if sam is None else refined(gem.model_version, sam.model_version)
        out.append(ImageRegions(results, score, version, maps=scores if keep_maps else None))
    return out


def sam_regions(
    spec: LabelingSpec, scores: dict[str, np.ndarray], image: Any, sam: Any, *, threshold: float | None = None
) -> tuple[list[dict[str, Any]], float]:
    """Every control's regions from score maps with ``refine=sam``: per control, each label's thresholded
    mask (the pixels where it is the best label, as :func:`~workers.regions.regions_from_scores` assigns
    them) is sharpened by :func:`workers.models.sam.refine_mask` before it becomes regions."""
    from workers.models.sam.refine import refine_mask

    results: list[dict[str, Any]] = []
    for control in spec.controls:
        model = control_model(control, threshold=threshold)
        if model.skip or not control.labels:
            continue
        best, index = model.best_label(scores, width=image.width, height=image.height)
        foreground = best >= model.threshold
        for i, label in enumerate(control.labels):
            mask = foreground & (index == i)
            if mask.any():
                sharp, _ = refine_mask(sam, image, mask, np.where(mask, best, 0.0))
                results.extend(model.regions(label, sharp, best, width=image.width, height=image.height))
    return results, prediction_score(results)


def label_for_expression(control: ControlSpec, expression: str) -> str:
    """The control's label whose name (or one of its prompts) the expression contains, else its first."""
    words = set(re.findall(r"[a-z0-9]+", expression.lower()))
    for label in control.labels:
        for name in (label, *control.prompts.get(label, [])):
            tokens = re.findall(r"[a-z0-9]+", name.lower())
            if tokens and all(t in words for t in tokens):
                return label
    return control.labels[0]


def _mask_regions(spec: LabelingSpec, mask: Any, score_map: Any, image: Any, label_of) -> tuple[list, float]:
    results: list[dict[str, Any]] = []
    if not mask.any():
        return results, 0.0
    for control in spec.controls:
        results.extend(
            regions_from_mask(
                control, label_of(control), mask, score_map, width=image.width, height=image.height
            )
        )
    score = float(score_map[mask].mean()) if score_map is not None else 1.0
    return results, score


def expression_regions(
    spec: LabelingSpec,
    image: Any,
    expression: str,
    *,
    lavt: Any,
    gem: Any,
    stand_in_version: str,
    sam: Any = None,
    threshold: float | None = None,
) -> ImageRegions:
    """One region per control for a referring expression: LAVT's mask, or GEM's map of the expression
    thresholded at the lowest control threshold when ``lavt`` is None (named ``stand_in_version``).
    ``sam``: a promptable SAM that sharpens the mask first (``refine=sam``); ``threshold``: a calibrated
    threshold instead of either engine's own."""
    meta: dict[str, Any] = {}
    if lavt is not None:
        ((prob, lavt_meta),) = lavt.probabilities([image], [expression])
        prob = np.asarray(prob, dtype=np.float32)
        mask = prob >= (LAVT_MASK_THRESHOLD if threshold is None else threshold)
        version = lavt.model_version
        if (lavt_meta or {}).get("truncated"):
            meta = {"truncated": True, "tokens": lavt_meta.get("tokens")}
    else:
        (maps,) = gem.heatmaps([image], [expression])
        prob = maps[0]
        if threshold is None:
            threshold = min((control_threshold(c) for c in spec.controls), default=DEFAULT_THRESHOLD)
        mask = prob >= threshold
        version = stand_in_version
    if sam is not None:  # named after both engines even when there is nothing to sharpen
        from workers.models.sam.refine import refine_mask

        if mask.any():
            mask, _ = refine_mask(sam, image, mask, np.where(mask, prob, 0.0))
        version = refined(version, sam.model_version)
    results, score = _mask_regions(spec, mask, prob, image, lambda c: label_for_expression(c, expression))
    return ImageRegions(results, score, version, meta)


def click_mask(score_map: np.ndarray, click: Click, threshold: float) -> np.ndarray:
    """The part of the thresholded score map that a click or box selects."""
    import cv2

    h, w = score_map.shape
    if click.kind == "keypointlabels":
        px, py = click.pixel_point(w, h)
        at = float(score_map[py, px])
        if at <= 0:
            return np.zeros((h, w), dtype=bool)
        binary = (score_map >= min(threshold, 0.5 * at)).astype(np.uint8)
        _, labels = cv2.connectedComponents(binary, connectivity=8)
        return labels == labels[py, px]
    x0, y0, x1, y1 = click.pixel_box(w, h)
    inside = score_map[y0:y1, x0:x1]
    peak = float(inside.max()) if inside.size else 0.0
    mask = np.zeros((h, w), dtype=bool)
    if peak > 0:
        mask[y0:y1, x0:x1] = inside >= min(threshold, 0.5 * peak)
    return mask


def _seed(click: Click, width: int, height: int) -> tuple[int, int]:
    """The pixel a click stands for: the clicked point, or the centre of a box."""
    if click.kind == "keypointlabels":
        return click.pixel_point(width, height)
    x0, y0, x1, y1 = click.pixel_box(width, height)
    return (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2


def _distance_to(points: Sequence[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's Euclidean distance to the nearest of ``points`` (``inf`` without any)."""
    import cv2

    if not points:
        return np.full(shape, np.inf, dtype=np.float32)
    source = np.ones(shape, dtype=np.uint8)
    for x, y in points:
        source[y, x] = 0
    return cv2.distanceTransform(source, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def clicks_mask(score_map: np.ndarray, clicks: Sequence[Click], threshold: float) -> np.ndarray:
    """One label's clicks combined into one mask.

    The positive clicks and boxes select their parts of the thresholded map (:func:`click_mask`). A
    negative key point carves out, from the part of that mask it touches (the selected component it lies
    on, or the component of the map under it), the pixels nearer to a negative click than to every
    positive one (Euclidean distance; ties stay), so that a negative click on the object removes the side
    nearest to it instead of the whole object. A negative box removes everything it selects.
    """
    import cv2

    h, w = score_map.shape
    positives = [c for c in clicks if c.positive]
    mask = np.zeros((h, w), dtype=bool)
    for click in positives:
        mask |= click_mask(score_map, click, threshold)
    negatives = [c for c in clicks if not c.positive]
    if not mask.any() or not negatives:
        return mask
    points = [c for c in negatives if c.kind == "keypointlabels"]
    if points:
        _, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        nearer = _distance_to([_seed(c, w, h) for c in points], (h, w)) < _distance_to(
            [_seed(c, w, h) for c in positives], (h, w)
        )
        touched = np.zeros((h, w), dtype=bool)
        for click in points:
            px, py = click.pixel_point(w, h)
            touched |= click_mask(score_map, click, threshold)
            if mask[py, px]:
                touched |= parts == parts[py, px]
        mask &= ~(touched & nearer)
    for click in negatives:
        if click.kind != "keypointlabels":
            mask &= ~click_mask(score_map, click, threshold)
    return mask


def sam_prompts(clicks: Sequence[Click], width: int, height: int) -> list[tuple[Any, bool]]:
    """One label's clicks as SAM prompts, each with whether its mask is added (True) or removed.

    Every box is one prompt, with the key points (positive and negative) that lie inside it; the key
    points outside every box form one more prompt when one of them is positive. A negative box's mask is
    removed from the others'. Coordinates are pixel centres in the image plane.
    """
    from workers.models.sam.engine import Prompt

    points = [c for c in clicks if c.kind == "keypointlabels"]
    boxes = [c.pixel_box(width, height) for c in clicks if c.kind != "keypointlabels"]
    box_sign = [c.positive for c in clicks if c.kind != "keypointlabels"]
    seeds = [(c.pixel_point(width, height), int(c.positive)) for c in points]
    prompts: list[tuple[Any, bool]] = []
    used: set[int] = set()
    for (x0, y0, x1, y1), positive in zip(boxes, box_sign, strict=True):
        inside = [i for i, ((px, py), _) in enumerate(seeds) if x0 <= px < x1 and y0 <= py < y1]
        used.update(inside)
        pts = [(seeds[i][0][0] + 0.5, seeds[i][0][1] + 0.5) for i in inside]
        box = (float(x0), float(y0), float(x1), float(y1))
        prompts.append((Prompt(pts, [seeds[i][1] for i in inside], box), positive))
    rest = [i for i in range(len(seeds)) if i not in used]
    if any(seeds[i][1] for i in rest):
        pts = [(seeds[i][0][0] + 0.5, seeds[i][0][1] + 0.5) for i in rest]
        prompts.append((Prompt(pts, [seeds[i][1] for i in rest]), True))
    return prompts


def sam_clicks_mask(sam: Any, image: Any, clicks: Sequence[Click]) -> tuple[np.ndarray, float]:
    """One label's clicks through a promptable SAM (:func:`sam_prompts`): the union of the added masks
    minus the removed ones, and the mean of SAM's predicted IoUs. One click alone takes the best of SAM's
    three candidates (a click is ambiguous); more prompts take its single answer."""
    mask = np.zeros((image.height, image.width), dtype=bool)
    prompts = sam_prompts(clicks, image.width, image.height)
    scores: list[float] = []
    for prompt, positive in sorted(prompts, key=lambda p: not p[1]):  # added first, then removed
        multimask = len(prompt.points) == 1 and prompt.box is None
        ((candidates, predicted),) = sam.segment(image, [prompt], multimask=multimask)
        if positive:
            mask |= candidates[0]
            scores.append(float(predicted[0]))
        else:
            mask &= ~candidates[0]
    return mask, float(np.clip(np.mean(scores), 0.0, 1.0)) if scores else 0.0


def click_regions(
    spec: LabelingSpec,
    image: Any,
    clicks: Sequence[Click],
    *,
    gem: Any,
    excluded: set[str] = frozenset(),
    sam: Any = None,
) -> ImageRegions:
    """Regions for each clicked label. Its prompts and threshold come from every control that carries the
    label; the regions go to the controls not in ``excluded`` (those clicked with) that carry the label,
    or to all of them when none does. With ``sam`` (a promptable SAM engine), the clicks and boxes are its
    point and box prompts (:func:`sam_clicks_mask`) and GEM is not run; the regions' score is SAM's
    predicted IoU."""
    by_label: dict[str, list[Click]] = {}
    for click in clicks:
        by_label.setdefault(click.label, []).append(click)
    outputs = [c for c in spec.controls if c.name not in excluded]
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    for label, label_clicks in by_label.items():
        owners = [c for c in spec.controls if label in c.labels]
        if not owners:
            raise UserError(f"the clicked label {label!r} is not a label of any control in the label config")
        if sam is not None:
            mask, predicted = sam_clicks_mask(sam, image, label_clicks)
            score_map = np.full(mask.shape, predicted, dtype=np.float32)
        else:
            prompts = list(dict.fromkeys(p for c in owners for p in c.prompts[label]))
            threshold = min(control_threshold(c) for c in owners)
            (maps,) = gem.heatmaps([image], prompts)
            score_map = maps.max(axis=0)
            mask = clicks_mask(score_map, label_clicks, threshold)
        targets = [c for c in outputs if label in c.labels] or outputs
        target_spec = spec.without({c.name for c in spec.controls} - {c.name for c in targets})
        res, score = _mask_regions(
            target_spec, mask, score_map, image, lambda c, lab=label: lab if lab in c.labels else c.labels[0]
        )
        results.extend(res)
        if res:
            scores.append(score)
    version = gem.model_version if sam is None else sam.model_version
    return ImageRegions(results, float(np.mean(scores)) if scores else 0.0, version)


# -- instances (SAM 3): one region each -------------------------------------------------------------------


def engine_specs(spec: LabelingSpec, default: str = "gem") -> dict[str, LabelingSpec]:
    """The spec split by engine: each engine's controls (their ``engine`` attribute, else ``default``),
    in config order; an engine with no control is absent."""
    names = {c.name: c.engine(default) for c in spec.controls}
    out: dict[str, LabelingSpec] = {}
    for engine in dict.fromkeys(names.values()):
        out[engine] = spec.without({n for n, e in names.items() if e != engine})
    return out


def combine_regions(parts: Sequence[ImageRegions]) -> ImageRegions:
    """One image's regions from several engines: results concatenated, versions joined with ``+``."""
    if len(parts) == 1:
        return parts[0]
    results = [r for p in parts for r in p.results]
    versions = combined(p.model_version for p in parts)
    meta = {k: v for p in parts for k, v in p.meta.items()}
    maps = {k: v for p in parts for k, v in (p.maps or {}).items()} or None
    return ImageRegions(results, prediction_score(results), versions, meta, maps)


def instance_results(control: ControlSpec, label: str, instance: Any, *, width: int, height: int) -> list:
    """One instance's regions in one control, each scored with the instance's score: a polygon per
    part of its mask (Label Studio polygons have one outline), one brush mask, one box around its kept
    parts, one key point (the pixel deepest inside it)."""
    model = control_model(control)
    mask = instance.mask
    if control.type == "RectangleLabels":  # one box per instance, around the parts that pass min_region_area
        kept = find_components(mask, None, model.min_area_pixels(width, height)).kept_mask()
        if not kept.any():
            return []
        rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
        mask = np.zeros_like(kept)
        mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    results = model.regions(label, mask, None, width=width, height=height)
    for result in results:
        result["score"] = round(float(instance.score), 4)
    return results


def _instances_to_regions(
    spec: LabelingSpec, instances: Sequence[Any], image: Any, label_of, threshold: float | None
) -> list[dict[str, Any]]:
    """Every control's regions for the instances it takes: those of its labels (``label_of(control,
    instance)``, None: not this control's) scoring at least its threshold."""
    results: list[dict[str, Any]] = []
    for control in spec.controls:
        cut = control_threshold(control, threshold)
        for instance in instances:
            label = label_of(control, instance)
            if label is not None and instance.score >= cut:
                size = {"width": image.width, "height": image.height}
                results.extend(instance_results(control, label, instance, **size))
    return results


def _prompt_label(control: ControlSpec, instance: Any) -> str | None:
    for label in control.labels:
        if instance.prompt in control.prompts[label]:
            return label
    return None


def instance_regions(
    sam3: Any, spec: LabelingSpec, images: Sequence[Any], *, threshold: float | None = None
) -> list[ImageRegions | Exception]:
    """Regions of every control from SAM 3's instances of the spec's class prompts (synonyms of a label
    merged when their masks coincide); an image that fails gets its exception instead. Each control keeps
    the instances scoring at least its ``model_score_threshold`` (else ``threshold``, else 0.5)."""
    prompts, groups = prompt_groups(spec)
    images = list(images)
    if not images:
        return []
    floor = min(control_threshold(c, threshold) for c in spec.controls)
    try:
        found: list[Any] = list(sam3.instances(images, prompts, groups=groups, min_score=floor))
    except Exception as exc:  # isolate the image that breaks the batch
        if len(images) == 1:
            return [exc]
        log.warning("SAM 3 batch of %d images failed (%s); running them one by one", len(images), exc)
        found = []
        for image in images:
            try:
                found.append(sam3.instances([image], prompts, groups=groups, min_score=floor)[0])
            except Exception as one_exc:
                found.append(one_exc)
    out: list[ImageRegions | Exception] = []
    for image, instances in zip(images, found, strict=True):
        if isinstance(instances, Exception):
            out.append(instances)
            continue
        try:
            results = _instances_to_regions(spec, instances, image, _prompt_label, threshold)
        except Exception as exc:
            out.append(exc)
            continue
        meta = {"instances": len(instances)}
        out.append(ImageRegions(results, prediction_score(results), sam3.model_version, meta))
    return out


def phrase_regions(sam3: Any, spec: LabelingSpec, image: Any, phrase: str) -> ImageRegions:
    """A typed phrase through SAM 3: one region per instance in each control, labelled with the control's
    label that the phrase names (:func:`label_for_expression`)."""
    floor = min(control_threshold(c) for c in spec.controls)
    (instances,) = sam3.instances([image], [phrase], min_score=floor)
    labels = {c.name: label_for_expression(c, phrase) for c in spec.controls}
    results = _instances_to_regions(spec, instances, image, lambda c, _i: labels[c.name], None)
    meta = {"instances": len(instances)}
    return ImageRegions(results, prediction_score(results), sam3.model_version, meta)


def prompt_regions(
    spec: LabelingSpec,
    images: Sequence[Any],
    get_engine: Callable[[str], Any],
    *,
    default: str = "gem",
    threshold: float | None = None,
    sam: Any = None,
    keep_maps: bool = False,
) -> list[ImageRegions | Exception]:
    """Class prompts through each control's engine (:func:`engine_specs`), by what the engine answers
    (:mod:`workers.registry`): instances (:func:`instance_regions`) or score maps
    (:func:`class_prompt_regions`, sharpened by ``sam`` when given; kept on the results with
    ``keep_maps``), combined per image. ``get_engine(name)`` gives the engine named ``name``."""
    per_engine = []
    for name, part in (engine_specs(spec, default) or {"gem": spec}).items():
        if INSTANCES in get_entry(name).answers:
            per_engine.append(instance_regions(get_engine(name), part, images, threshold=threshold))
        else:
            per_engine.append(
                class_prompt_regions(
                    get_engine(name), part, images, threshold=threshold, sam=sam, keep_maps=keep_maps
                )
            )
    out: list[ImageRegions | Exception] = []
    for parts in zip(*per_engine, strict=True):
        failed = [p for p in parts if isinstance(p, Exception)]
        out.append(failed[0] if failed else combine_regions(parts))
    return out


def text_regions(
    spec: LabelingSpec,
    image: Any,
    text: str,
    get_engine: Callable[[str], Any],
    *,
    default: str = "gem",
    lavt: Any = None,
    stand_in_version: str = "",
    sam: Any = None,
    threshold: float | None = None,
) -> ImageRegions:
    """A typed phrase: the instances of the phrase in the controls whose engine answers instances
    (:func:`phrase_regions`), LAVT's mask, or the control's score-map engine standing in for it, in the
    others (:func:`expression_regions`; sharpened by ``sam`` when given, at ``threshold`` when given)."""
    parts = []
    for name, part in (engine_specs(spec, default) or {"gem": spec}).items():
        if INSTANCES in get_entry(name).answers:
            parts.append(phrase_regions(get_engine(name), part, image, text))
        else:
            gem = get_engine(name)
            parts.append(
                expression_regions(
                    part,
                    image,
                    text,
                    lavt=lavt,
                    gem=gem,
                    stand_in_version=stand_in_version,
                    sam=sam,
                    threshold=threshold,
                )
            )
    return combine_regions(parts)
