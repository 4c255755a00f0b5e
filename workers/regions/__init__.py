"""Heatmaps and masks to Label Studio regions (polygons, brush RLE, boxes, key points).

One small class per Label Studio control (``polygon_labels``, ``brush_labels``, ``rectangle_labels``,
``keypoint_labels``), each built from a :class:`~groundlabel.spec.ControlSpec` and reading
its options from the control tag's attributes. Per control: a label's score is the max over its prompt
synonyms, each pixel goes to the best label, and is background when that score is below the threshold
(:func:`control_threshold`: ``model_score_threshold`` on the tag, else the ``threshold`` argument, else
:data:`~workers.regions.base.DEFAULT_THRESHOLD`). The geometry convention is described in
:mod:`workers.regions.geometry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from groundlabel.spec import ControlSpec, LabelingSpec
from workers.regions.base import (
    DEFAULT_MIN_REGION_AREA,
    DEFAULT_THRESHOLD,
    MAX_WORKING_SIDE,
    ControlModel,
    control_threshold,
    working_size,
)
from workers.regions.brush_labels import BrushLabelsModel
from workers.regions.geometry import polygon_to_mask
from workers.regions.keypoint_labels import KeyPointLabelsModel
from workers.regions.polygon_labels import PolygonLabelsModel
from workers.regions.rectangle_labels import RectangleLabelsModel

#: Control tag → the class converting its regions.
CONTROL_MODELS: dict[str, type[ControlModel]] = {
    m.control_type: m
    for m in (PolygonLabelsModel, BrushLabelsModel, RectangleLabelsModel, KeyPointLabelsModel)
}

__all__ = [
    "CONTROL_MODELS",
    "DEFAULT_MIN_REGION_AREA",
    "DEFAULT_THRESHOLD",
    "MAX_WORKING_SIDE",
    "ControlModel",
    "control_model",
    "control_threshold",
    "polygon_to_mask",
    "regions_from_scores",
    "prediction_score",
    "regions_from_mask",
    "working_size",
]


def control_model(control: ControlSpec, *, threshold: float | None = None) -> ControlModel:
    """The converter for one control (its tag's options read and checked)."""
    try:
        cls = CONTROL_MODELS[control.type]
    except KeyError:
        raise ValueError(f"control {control.name!r}: no region conversion for {control.type}") from None
    return cls(control, threshold=threshold)


def prediction_score(results: list[dict[str, Any]]) -> float:
    """A prediction's score: the mean of its regions' scores, 0 when there are none."""
    scores = [float(r["score"]) for r in results if "score" in r]
    return round(float(np.mean(scores)), 4) if scores else 0.0


def regions_from_scores(
    spec: LabelingSpec,
    prompt_scores: Mapping[str, np.ndarray],
    *,
    width: int,
    height: int,
    threshold: float | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Every control's Label Studio results from per-prompt score maps.

    ``prompt_scores`` maps each prompt of ``spec.all_prompts()`` to a float map of calibrated scores in
    [0, 1] at :func:`working_size` ``(width, height)`` (the image's size up to 2048 px a side; maps of
    another size are resized bilinearly to it). Returns the results and
    the prediction's score (mean of the region scores, 0 when empty).
    """
    _check_size(width, height)
    results: list[dict[str, Any]] = []
    for control in spec.controls:
        model = control_model(control, threshold=threshold)
        results.extend(model.predict(prompt_scores, width=width, height=height))
    return results, prediction_score(results)


def regions_from_mask(
    control: ControlSpec,
    label: str,
    mask: np.ndarray,
    score_map: np.ndarray | None,
    *,
    width: int,
    height: int,
) -> list[dict[str, Any]]:
    """Results of one control for one binary mask (the LAVT path), with the same conversion code.

    Region scores are the mean of ``score_map`` inside each region (1.0 when ``score_map`` is None).
    """
    _check_size(width, height)
    return control_model(control).regions(label, mask, score_map, width=width, height=height)


def _check_size(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"the image size must be positive, got {width}x{height}")
