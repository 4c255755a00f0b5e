"""Whole-image and sliding-window protocols, synonyms, background threshold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from workers.evaluation.inference import (
    class_scores,
    flatten_classes,
    predict_labels,
    reduce_synonyms,
    resize_short_side,
    window_starts,
)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "crimson": (220, 20, 60)}


class ColourHeatmaps:
    """A real (if simple) heatmap function: a prompt's score is how close each pixel is to its colour."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[int, int]], int]] = []

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[np.ndarray]:
        self.calls.append(([im.size for im in images], len(prompts)))
        out = []
        for im in images:
            px = np.asarray(im.convert("RGB"), np.float32)
            maps = [1 - np.abs(px - np.array(COLOURS[p], np.float32)).sum(-1) / 765 for p in prompts]
            out.append(np.stack(maps).astype(np.float32))
        return out


def _image(w: int = 600, h: int = 400) -> tuple[Image.Image, np.ndarray]:
    arr = np.zeros((h, w, 3), np.uint8)
    truth = np.zeros((h, w), np.int64)
    arr[:, : w // 3] = COLOURS["red"]
    arr[:, w // 3 : 2 * w // 3] = COLOURS["green"]
    arr[:, 2 * w // 3 :] = COLOURS["blue"]
    truth[:, w // 3 : 2 * w // 3] = 1
    truth[:, 2 * w // 3 :] = 2
    return Image.fromarray(arr), truth


def test_window_starts_follow_mmseg() -> None:
    assert window_starts(448, 448, 224) == [0]
    assert window_starts(300, 448, 224) == [0]
    assert window_starts(672, 448, 224) == [0, 224]
    assert window_starts(700, 448, 224) == [0, 224, 252]


def test_resize_short_side_keeps_ratio() -> None:
    assert resize_short_side(Image.new("RGB", (1000, 500)), 448).size == (896, 448)
    assert resize_short_side(Image.new("RGB", (300, 600)), 448).size == (448, 896)


@pytest.mark.parametrize("mode", ["resize", "slide"])
def test_protocols_recover_the_regions(mode: str) -> None:
    image, truth = _image()
    fn = ColourHeatmaps()
    scores = class_scores(
        fn, image, [("red",), ("green",), ("blue",)], mode=mode, short_side=224, crop=224, stride=112
    )
    assert scores.shape == (3, 400, 600)
    pred = predict_labels(scores, background=False)
    interior = np.ones_like(truth, bool)
    for x in (200, 400):
        interior[:, x - 3 : x + 3] = False  # bilinear seams
    np.testing.assert_array_equal(pred[interior], truth[interior])
    if mode == "slide":
        ((sizes, n_prompts),) = fn.calls
        # short side 224 -> 336 x 224; windows at x = 0 and 112, one row
        assert sizes == [(224, 224), (224, 224)] and n_prompts == 3


def test_out_size_and_synonyms() -> None:
    image, _ = _image(60, 40)
    classes = [("red", "crimson"), ("blue",)]
    prompts, owner = flatten_classes(classes)
    assert prompts == ["red", "crimson", "blue"] and owner.tolist() == [0, 0, 1]
    scores = class_scores(ColourHeatmaps(), image, classes, out_size=(20, 30))
    assert scores.shape == (2, 20, 30)
    maps = np.stack([np.full((2, 2), v, np.float32) for v in (0.2, 0.7, 0.1)])
    np.testing.assert_allclose(reduce_synonyms(maps, owner, 2)[:, 0, 0], [0.7, 0.1])


def test_synonym_groups_reach_engines_that_take_them() -> None:
    seen = {}

    def grouped(images, prompts, *, groups=None):
        seen["groups"] = groups
        return [np.zeros((len(prompts), im.height, im.width), np.float32) for im in images]

    class_scores(grouped, Image.new("RGB", (8, 8)), [("a", "b"), ("c",)])
    assert seen["groups"] == [0, 0, 1]


def test_background_threshold() -> None:
    scores = np.array([[[0.9, 0.2]], [[0.1, 0.3]]], np.float32)  # 2 classes, 1 x 2 pixels
    np.testing.assert_array_equal(predict_labels(scores, background=True, bg_threshold=0.5), [[1, 0]])
    np.testing.assert_array_equal(predict_labels(scores, background=True, bg_threshold=0.25), [[1, 2]])
    np.testing.assert_array_equal(predict_labels(scores, background=False), [[0, 1]])
    with pytest.raises(ValueError):
        predict_labels(scores, background=True)
    with pytest.raises(ValueError, match="stride"):
        class_scores(ColourHeatmaps(), Image.new("RGB", (8, 8)), [("red",)], mode="slide", crop=4, stride=8)
