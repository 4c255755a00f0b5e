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
from workers.regions.geometry import Components, find_components

log = logging.getLogger(__name__)

#: A pixel is background when its best calibrated score is below this (``model_score_threshold``).
DEFAULT_THRESHOLD = 0.5
#: Components smaller than this are dropped: pixels when >= 1, a fraction of the image when < 1.
DEFAULT_MIN_REGION_AREA = 0.0001

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def control_threshold(control: ControlSpec, default: float | None = None) -> float:
    """The score below which a pixel is background for this control: its ``model_score_threshold``
    attribute, else ``default``, else :data:`DEFAULT_THRESHOLD`; checked to lie in [0, 1]."""
    fallback = DEFAULT_THRESHOLD if default is None else float(default)
    value = control.option_float("model_score_threshold", fallback)
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"control {control.name!r}: model_score_threshold={value!r} must lie in [0.0, 1.0]")
    return value


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
        self.min_region_area = self.option_float("min_region_area", DEFAULT_MIN_REGION_AREA, low=0.0)
        self.skip = self.option_bool("model_skip", False)

    # -- options -------------------------------------------------------------------------------
    def option_float(
        self, key: str, default: float, *, low: float | None = None, high: float | None = None
    ) -> float:
        """A numeric tag attribute checked against its range; ``UserError`` with the reason."""
        value = self.control.option_float(key, default)
        if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise UserError(f"control {self.control.name!r}: {key}={value!r} must lie in {bounds}")
        return value

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
        """Per pixel: the best label's score (max over its prompts) and its index into ``labels``.

        Ties go to the first label.
        """
        best: np.ndarray | None = None
        index = np.zeros((height, width), dtype=np.int32)
        for i, label in enumerate(self.control.labels):
            label_score: np.ndarray | None = None
            for prompt in self.control.prompts.get(label) or [label]:
                s = prompt_score_map(prompt_scores, prompt, width=width, height=height, control=self.control)
                label_score = s if label_score is None else np.maximum(label_score, s)
            assert label_score is not None
            if best is None:
                best = label_score.copy()
                continue
            better = label_score > best
            np.copyto(index, i, where=better)
            np.maximum(best, label_score, out=best)
        assert best is not None
        return best, index

    def predict(
        self, prompt_scores: Mapping[str, np.ndarray], *, width: int, height: int
    ) -> list[dict[str, Any]]:
        """All regions of this control from per-prompt score maps (at the original size)."""
        if self.skip or not self.control.labels:
            return []
        best, index = self.best_label(prompt_scores, width=width, height=height)
        foreground = best >= self.threshold
        results: list[dict[str, Any]] = []
        for i, label in enumerate(self.control.labels):
            mask = foreground & (index == i)
            if mask.any():
                results.extend(self.regions(label, mask, best, width=width, height=height))
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
        """The control-specific conversion of the kept components of one label."""
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


def prompt_score_map(
    prompt_scores: Mapping[str, np.ndarray], prompt: str, *, width: int, height: int, control: ControlSpec
) -> np.ndarray:
    """The score map of one prompt, checked and at the original size."""
    try:
        raw = prompt_scores[prompt]
    except KeyError:
        raise ValueError(
            f"no score map for prompt {prompt!r} of control {control.name!r} "
            f"(maps given for {sorted(prompt_scores)[:10]})"
        ) from None
    return resize_score_map(np.asarray(raw, dtype=np.float32), width, height)
