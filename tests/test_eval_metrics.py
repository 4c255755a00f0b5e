"""mIoU as mmsegmentation computes it, and the printed table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.evaluation.metrics import ConfusionMatrix, format_table


def test_iou_by_hand() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 3, gt 3, pred 4 -> 3/4
    # class 2: tp 1, gt 2, pred 1 -> 1/2
    np.testing.assert_allclose(cm.iou()[:3], [1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(cm.iou()[3])  # absent everywhere: not averaged
    s = cm.summary(["a", "b", "c", "d"])
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["aAcc"] == pytest.approx(100 * 5 / 7)
    assert s["pixels"] == 7 and s["per_class"]["d"]["IoU"] is None


def test_predicted_but_absent_class_counts_as_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2]), np.array([0, 0]))
    iou = cm.iou()
    assert iou[0] == pytest.approx(0.5) and iou[2] == 0.0 and math.isnan(iou[1])
    assert cm.summary()["mIoU"] == pytest.approx(25.0)


def test_accumulates_over_images_and_rejects_bad_input() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.zeros((2, 2), int), np.zeros((2, 2), int))
    cm.update(np.ones((2, 2), int), np.ones((2, 2), int))
    assert cm.summary()["mIoU"] == 100.0 and cm.matrix.sum() == 8
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.full((2, 2), 5), np.zeros((2, 2), int))


def test_table_lists_every_class() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    text = format_table(cm.summary(["road", "sky"]), "title")
    assert text.splitlines()[0] == "title"
    assert "road" in text and "sky" in text and "mIoU" in text and " 50.00" in text
