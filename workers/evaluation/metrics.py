"""Confusion-matrix segmentation metrics (mIoU as mmsegmentation computes it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from workers.evaluation.datasets import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a ``[num_classes, num_classes]`` (ground truth × prediction) pixel count matrix."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image; pixels whose ground truth is the ignore index (or out of range) are skipped."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        valid = (gt != self.ignore_index) & (gt >= 0) & (gt < self.num_classes)
        if ((pred[valid] < 0) | (pred[valid] >= self.num_classes)).any():
            raise ValueError(f"prediction holds ids outside [0, {self.num_classes})")
        n = self.num_classes
        self.matrix += np.bincount(gt[valid] * n + pred[valid], minlength=n * n).reshape(n, n)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def accuracy(self) -> np.ndarray:
        """Per-class pixel accuracy (recall); NaN for classes absent from the ground truth."""
        tp = np.diag(self.matrix).astype(np.float64)
        total = self.matrix.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, tp / total, np.nan)

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """mIoU, mAcc, aAcc (all in percent) and per-class IoU / accuracy."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        iou, acc = self.iou(), self.accuracy()
        total = self.matrix.sum()
        # like mmsegmentation: a class counts once it occurs in the ground truth or in the prediction
        return {
            "mIoU": float(np.nanmean(iou) * 100) if not np.isnan(iou).all() else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if not np.isnan(acc).all() else float("nan"),
            "aAcc": float(np.diag(self.matrix).sum() / total * 100) if total else float("nan"),
            "per_class": {
                n: {
                    "IoU": None if np.isnan(i) else float(i * 100),
                    "Acc": None if np.isnan(a) else float(a * 100),
                }
                for n, i, a in zip(names, iou, acc, strict=True)
            },
            "pixels": int(total),
        }


def format_table(summary: dict, title: str = "") -> str:
    """A plain-text table: one row per class (IoU, Acc), then the means."""
    rows = [(name, v["IoU"], v["Acc"]) for name, v in summary["per_class"].items()]
    width = max([len("class"), *(len(r[0]) for r in rows)])
    fmt = lambda x: "   n/a" if x is None else f"{x:6.2f}"  # noqa: E731
    lines = [title] if title else []
    lines += [f"{'class':<{width}} | {'IoU':>6} | {'Acc':>6}", f"{'-' * width}-+-{'-' * 6}-+-{'-' * 6}"]
    lines += [f"{n:<{width}} | {fmt(i)} | {fmt(a)}" for n, i, a in rows]
    lines += [
        f"{'-' * width}-+-{'-' * 6}-+-{'-' * 6}",
        f"{'mIoU':<{width}} | {summary['mIoU']:6.2f} |",
        f"{'mAcc':<{width}} | {summary['mAcc']:6.2f} |",
        f"{'aAcc':<{width}} | {summary['aAcc']:6.2f} |",
    ]
    return "\n".join(lines)
