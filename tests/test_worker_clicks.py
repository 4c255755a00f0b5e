"""Interactive clicks: a negative click carves the part of the mask nearest to it (docs/regions.md)."""

from __future__ import annotations

import numpy as np

from groundlabel.ls_format import Click
from workers.pipeline import clicks_mask


def _point(x: int, y: int, size: int, positive: bool = True) -> Click:
    """A key point on pixel (x, y) of a ``size`` × ``size`` image (percent at the pixel's centre)."""
    return Click(
        "keypointlabels", "Thing", "click", 100 * (x + 0.5) / size, 100 * (y + 0.5) / size, positive=positive
    )


def _blob(size: int = 60) -> np.ndarray:
    score = np.full((size, size), 0.05, dtype=np.float32)
    score[20:40, 10:50] = 0.9  # one object, 40 pixels wide
    return score


def test_negative_click_on_the_object_carves_the_part_nearest_to_it():
    score = _blob()
    mask = clicks_mask(score, [_point(15, 30, 60), _point(45, 30, 60, positive=False)], threshold=0.5)
    assert mask.any(), "the negative click erased the whole object"
    assert mask[30, 15] and not mask[30, 45]
    # The split is at the midpoint between the two seeds (x = 30): nearer the positive click is kept.
    assert mask[20:40, 10:30].all()
    assert not mask[20:40, 31:50].any()
    assert not mask[:20].any() and not mask[40:].any()


def test_negative_click_elsewhere_or_alone():
    score = _blob()
    positive = _point(15, 30, 60)
    alone = clicks_mask(score, [positive], threshold=0.5)
    assert alone.sum() == 20 * 40
    # A negative click on the background leaves the object whole.
    background = clicks_mask(score, [positive, _point(5, 5, 60, positive=False)], threshold=0.5)
    assert np.array_equal(background, alone)
    # Only a negative click: nothing is selected.
    assert not clicks_mask(score, [_point(45, 30, 60, positive=False)], threshold=0.5).any()


def test_two_objects_negative_click_removes_only_its_part():
    score = np.full((60, 60), 0.05, dtype=np.float32)
    score[5:15, 5:25] = 0.9  # object A
    score[40:55, 30:55] = 0.8  # object B
    clicks = [_point(10, 10, 60), _point(40, 47, 60), _point(52, 47, 60, positive=False)]
    mask = clicks_mask(score, clicks, threshold=0.5)
    assert mask[5:15, 5:25].all()  # A untouched: the negative click is on B
    assert mask[47, 40] and not mask[47, 52]
    assert mask[40:55, 30:46].all() and not mask[40:55, 47:55].any()


def test_negative_box_removes_what_it_selects():
    score = _blob()
    box = Click("rectanglelabels", "Thing", "box", 100 * 40.5 / 60, 0.0, 100 * 20 / 60, 100.0, positive=False)
    mask = clicks_mask(score, [_point(15, 30, 60), box], threshold=0.5)
    assert mask[20:40, 10:40].all() and not mask[:, 40:].any()
