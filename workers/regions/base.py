"""The shared part of every control model: options, score maps to per-label masks, components."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import numpy as np

from groundlabel.errors import UserError
from groundlabel.ls_format import make_result
from groundlabel.spec import ControlSpec
from workers.regions.geometry import Components, find_components, index_runs, label_components, update_best

log = logging.getLogger(__name__)

#: A pixel is background when its best calibrated score is below this (``model_score_threshold``).
DEFAULT_THRESHOLD = 0.5
#: Components smaller than this are dropped: pixels when >= 1, a fraction of the image when < 1.
DEFAULT_MIN_REGION_AREA = 0.0001
#: Score maps become regions at the image's size up to this longer side, above it at this side (GEM's
#: maps come from a grid of a few dozen tokens: a finer grid adds no detail, only memory).
MAX_WORKING_SIDE = 2048

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def control_threshold(control: ControlSpec, default: float | None = None) -> float:
    """The score below which a pixel is background for this control: its ``model_score_threshold``
    attribute, else ``default``, else :data:`DEFAULT_THRESHOLD`; checked against the spec's bounds."""
    return control.number("model_score_threshold", DEFAULT_THRESHOLD if default is None else float(default))


class ControlModel:
    """Turns score maps or masks into Label Studio results for one control tag.

    Options read from the tag's attributes (all optional):

    - ``model_score_threshold``: background below this score (0..1, default :data:`DEFAULT_THRESHOLD`);
    - ``min_region_area``: drop smaller components (pixels if >= 1, fraction of the image if < 1);
    - ``model_skip="true"``: leave this control out of predictions.

    Subclasses add their own (see each module) and implement :meth:`component_regions`.
    """

    control_type: ClassVar[str] = ""

    def __init__(self, control: ControlSpec, *, threshold: float | None = None) -> None:
        if control.type != self.control_type:
            raise ValueError(f"{type(self).__name__} converts {self.control_type}, not {control.type}")
        self.control = control
        self.threshold = control_threshold(control, threshold)
        self.min_region_area = control.number("min_region_area", DEFAULT_MIN_REGION_AREA)
        self.skip = self.option_bool("model_skip", False)

    # -- options (numeric ones are read with ControlSpec.number, bounded by the spec) -------------
    def option_bool(self, key: str, default: bool) -> bool:
        """A yes/no tag attribute (true/false, 1/0, yes/no, on/off)."""
        raw = self.control.options.get(key)
        if raw is None:
            return default
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"control {self.control.name!r}: {key}={raw!r} must be true or false")

    def min_area_pixels(self, width: int, height: int) -> float:
        """``min_region_area`` in pixels for an image of this size."""
        a = self.min_region_area
        return a if a >= 1 else a * width * height

    # -- score maps to masks -------------------------------------------------------------------
    def best_label(
        self, prompt_scores: Mapping[str, np.ndarray], *, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel: the best label's score (max over its prompts) and its index into ``labels``
        (float32 and int32 ``[height, width]``; maps of another size are resized bilinearly).

        Ties go to the first label; NaN and -inf scores count as 0, +inf as 1. One compiled pass per
        prompt map."""
        best = np.full((height, width), -np.inf, dtype=np.float32)
        index = np.zeros((height, width), dtype=np.int32)
        flat_best, flat_index = best.reshape(-1), index.reshape(-1)
        for i, label in enumerate(self.control.labels):
            for prompt in self.control.prompts.get(label) or [label]:
                raw = prompt_map(prompt_scores, prompt, width=width, height=height, control=self.control)
                update_best(raw.reshape(-1), flat_best, flat_index, i)
        return best, index

    def predict(
        self, prompt_scores: Mapping[str, np.ndarray], *, width: int, height: int
    ) -> list[dict[str, Any]]:
        """All regions of this control from per-prompt score maps.

        The maps are read at :func:`working_size` (the image's size up to :data:`MAX_WORKING_SIDE`):
        maps of another size are resized to it bilinearly. One pass finds the runs of pixels each label
        wins, one labels the components of every label together; each component is then converted from
        its runs and bounding box, so past reading the maps the cost grows with the regions, not
        labels x image size."""
        if self.skip or not self.control.labels:
            return []
        gw, gh = working_size(width, height)
        best, index = self.best_label(prompt_scores, width=gw, height=gh)
        runs = index_runs(index, best, np.float32(self.threshold))
        min_area = self.min_area_pixels(width, height) * (gw * gh) / (width * height)
        per_label = label_components(runs, best, len(self.control.labels), min_area, (gh, gw))
        results: list[dict[str, Any]] = []
        for label, comps in zip(self.control.labels, per_label, strict=True):
            if comps is not None:
                results.extend(self.component_regions(label, comps, best, width=width, height=height))
        return results

    def regions(
        self, label: str, mask: np.ndarray, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        """Regions of one label from a binary mask; scores are means of ``score_map`` inside them."""
        if self.skip:
            return []
        if label not in self.control.labels:
            raise UserError(
                f"control {self.control.name!r} has no label {label!r} (it has {self.control.labels})"
            )
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
        if mask.shape != (height, width):
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        mask = mask > 0
        if score_map is not None:
            score_map = resize_score_map(np.asarray(score_map, dtype=np.float32), width, height)
        comps = find_components(mask, score_map, self.min_area_pixels(width, height))
        if len(comps) == 0:
            return []
        return self.component_regions(label, comps, score_map, width=width, height=height)

    def component_regions(
        self, label: str, comps: Components, score_map: np.ndarray | None, *, width: int, height: int
    ) -> list[dict[str, Any]]:
        """The control-specific conversion of the kept components of one label: ``comps`` lie on a grid
        of ``comps.image_shape`` (the working size: percent coordinates come from it), ``score_map`` is
        that grid's scores (None for a mask without scores), ``width``/``height`` the original image's
        size."""
        raise NotImplementedError

    def result(self, value: dict[str, Any], label: str, score: float, *, width: int, height: int) -> dict:
        """A Label Studio result of this control; ``value`` gets the ``<type>: [label]`` list."""
        value = {**value, self.control.result_type: [label]}
        return make_result(
            from_name=self.control.name,
            to_name=self.control.to_name,
            result_type=self.control.result_type,
            value=value,
            width=width,
            height=height,
            score=float(np.clip(score, 0.0, 1.0)),
        )


def resize_score_map(score: np.ndarray, width: int, height: int) -> np.ndarray:
    """A 2-D float32 score map at ``(height, width)`` (bilinear when it has another size), NaN → 0."""
    if score.ndim != 2:
        raise ValueError(f"a score map must be 2-D, got shape {score.shape}")
    if score.shape != (height, width):
        log.debug("resizing a score map from %s to %dx%d", score.shape, width, height)
        score = cv2.resize(score.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    score = score.astype(np.float32, copy=False)
    if not np.isfinite(score).all():
        score = np.nan_to_num(score, nan=0.0, posinf=1.0, neginf=0.0)
    return score


def working_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` at which score maps become regions: the image's own size, or scaled down (aspect
    kept) so that its longer side is :data:`MAX_WORKING_SIDE`. Percent coordinates do not depend on it;
    brush masks are scaled back to the original size (nearest)."""
    side = max(width, height)
    if side <= MAX_WORKING_SIDE:
        return int(width), int(height)
    scale = MAX_WORKING_SIDE / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def prompt_map(
    prompt_scores: Mapping[str, np.ndarray], prompt: str, *, width: int, height: int, control: ControlSpec
) -> np.ndarray:
    """The float32 score map of one prompt at ``(height, width)`` (bilinear when it has another size),
    not checked for NaN (:meth:`ControlModel.best_label` treats them)."""
    try:
        raw = prompt_scores[prompt]
    except KeyError:
        raise ValueError(
            f"no score map for prompt {prompt!r} of control {control.name!r} "
            f"(maps given for {sorted(prompt_scores)[:10]})"
        ) from None
    score = np.asarray(raw, dtype=np.float32)
    if score.ndim != 2:
        raise ValueError(f"a score map must be 2-D, got shape {score.shape}")
    if score.shape != (height, width):
        log.debug("resizing a score map from %s to %dx%d", score.shape, width, height)
        score = cv2.resize(score, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(score)
