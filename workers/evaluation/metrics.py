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


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return np.asarray(mask, dtype=bool) & ~inner


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0) -> float | None:
    """The boundary F-score of two binary masks (Perazzi et al., DAVIS): the harmonic mean of the fraction
    of predicted boundary pixels within ``tolerance`` pixels of the true boundary and the converse; None
    when both masks are empty, 0 when only one is."""
    import cv2

    bp, bg = mask_boundary(pred), mask_boundary(gt)
    if not bp.any() and not bg.any():
        return None
    if not bp.any() or not bg.any():
        return 0.0
    to_gt = cv2.distanceTransform((~bg).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    to_pred = cv2.distanceTransform((~bp).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    precision = float((to_gt[bp] <= tolerance).mean())
    recall = float((to_pred[bg] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class BoundaryF:
    """Mean boundary F-score per class over images (a class counts in an image where it occurs in the
    ground truth or the prediction), and their mean over classes (in percent)."""

    def __init__(self, num_classes: int, tolerance: float = 2.0, ignore: Sequence[int] = ()) -> None:
        self.num_classes = num_classes
        self.tolerance = tolerance
        self.ignore = set(ignore)
        self.sums = np.zeros(num_classes)
        self.counts = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image's label maps."""
        for c in range(self.num_classes):
            if c in self.ignore:
                continue
            f = boundary_f(pred == c, gt == c, self.tolerance)
            if f is not None:
                self.sums[c] += f
                self.counts[c] += 1

    def mean(self) -> float:
        """Mean over the classes seen of their mean F-score, in percent."""
        seen = self.counts > 0
        return float((self.sums[seen] / self.counts[seen]).mean() * 100) if seen.any() else float("nan")
