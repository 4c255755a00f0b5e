"""The one road from decoded images to Label Studio regions, for the jobs and ``groundlabel predict``.

Three ways in, each a function:

- :func:`class_prompt_regions`: every label's prompts (its ``predicted_values`` synonyms, which share the
  label's probability instead of competing) through GEM as one batch; a batch that fails is run again one
  image at a time, so that one bad image fails alone. Each control turns the score maps into regions at
  its own threshold (:func:`workers.regions.control_threshold`).
- :func:`expression_regions`: a referring expression through LAVT (or GEM standing in for it); the mask
  becomes one region per control, labelled with the control's label that the expression names.
- :func:`click_regions`: interactive key points and boxes; GEM scores the clicked label and the part of its
  thresholded map under each positive click (inside each box) is kept; a negative click carves out the
  part of that mask nearer to it than to any positive click (:func:`clicks_mask`).

Each returns :class:`ImageRegions`; the model version it carries is the engine's that produced it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.ls_format import Click
from groundlabel.spec import ControlSpec, LabelingSpec
from workers.regions import (
    DEFAULT_THRESHOLD,
    control_threshold,
    regions_from_mask,
    regions_from_scores,
    working_size,
)

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
    keep_maps: bool = False,
) -> list[ImageRegions | Exception]:
    """Regions of every control for each image from the spec's class prompts; an image that fails gets
    its exception instead. ``threshold`` is the default for controls without ``model_score_threshold``.

    Memory stays bounded whatever the images' size: GEM's maps are upsampled only to the regions'
    working size (:func:`workers.regions.working_size`, at most 2048 px a side), and the images go
    through GEM in groups whose maps fit :data:`MAP_BUDGET_BYTES` (one image at a time when they are
    large), each image's maps read one prompt at a time (:class:`PromptMaps`) and dropped once it has its
    regions (kept on the result, for overlays, with ``keep_maps``)."""
    prompts, groups = prompt_groups(spec)
    images = list(images)
    out: list[ImageRegions | Exception] = []
    for group in _map_groups(images, len(prompts)):
        out.extend(_class_prompt_group(gem, spec, group, prompts, groups, threshold, keep_maps))
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
            results, score = regions_from_scores(
                spec, scores, width=image.width, height=image.height, threshold=threshold
            )
        except Exception as exc:
            out.append(exc)
            continue
        out.append(ImageRegions(results, score, gem.model_version, maps=scores if keep_maps else None))
    return out


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
    spec: LabelingSpec, image: Any, expression: str, *, lavt: Any, gem: Any, stand_in_version: str
) -> ImageRegions:
    """One region per control for a referring expression: LAVT's mask, or GEM's map of the expression
    thresholded at the lowest control threshold when ``lavt`` is None (named ``stand_in_version``)."""
    meta: dict[str, Any] = {}
    if lavt is not None:
        ((prob, lavt_meta),) = lavt.probabilities([image], [expression])
        prob = np.asarray(prob, dtype=np.float32)
        mask = prob >= LAVT_MASK_THRESHOLD
        version = lavt.model_version
        if (lavt_meta or {}).get("truncated"):
            meta = {"truncated": True, "tokens": lavt_meta.get("tokens")}
    else:
        (maps,) = gem.heatmaps([image], [expression])
        prob = maps[0]
        mask = prob >= min((control_threshold(c) for c in spec.controls), default=DEFAULT_THRESHOLD)
        version = stand_in_version
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


def click_regions(
    spec: LabelingSpec, image: Any, clicks: Sequence[Click], *, gem: Any, excluded: set[str] = frozenset()
) -> ImageRegions:
    """Regions for each clicked label. Its prompts and threshold come from every control that carries the
    label; the regions go to the controls not in ``excluded`` (those clicked with) that carry the label,
    or to all of them when none does."""
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
    return ImageRegions(results, float(np.mean(scores)) if scores else 0.0, gem.model_version)
