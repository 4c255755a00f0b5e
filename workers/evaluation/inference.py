"""Dense class scores for one image from any heatmap function: whole-image or sliding-window protocol.

``HeatmapFn`` is the GEM engine's interface: ``heatmaps(images, prompts) -> [len(prompts), H, W]`` per
image at that image's own size. Classes with several synonyms are passed as ``groups`` (the engine then
lets synonyms share their class's calibrated probability instead of competing) when the function takes
that keyword; a class's score is the best of its synonyms' maps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

HeatmapFn = Callable[[Sequence[Image.Image], Sequence[str]], list[np.ndarray]]
MODES = ("resize", "slide")


def flatten_classes(classes: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """All synonym prompts in order, and for each prompt the index of its class."""
    prompts: list[str] = []
    owner: list[int] = []
    for i, synonyms in enumerate(classes):
        if not synonyms:
            raise ValueError(f"class {i} has no name")
        prompts.extend(synonyms)
        owner.extend([i] * len(synonyms))
    return prompts, np.asarray(owner, dtype=np.int64)


def reduce_synonyms(maps: np.ndarray, owner: np.ndarray, num_classes: int) -> np.ndarray:
    """``[P, H, W]`` prompt maps → ``[num_classes, H, W]`` class maps (max over each class's synonyms)."""
    if len(owner) == num_classes and (owner == np.arange(num_classes)).all():
        return maps
    out = np.full((num_classes, *maps.shape[1:]), -np.inf, dtype=maps.dtype)
    for p, c in enumerate(owner):
        np.maximum(out[c], maps[p], out=out[c])
    return out


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Resize so that the shorter side is ``short_side`` pixels, keeping the aspect ratio (bilinear)."""
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.BILINEAR)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis, mmsegmentation's slide rule: the last window ends at the border."""
    if length <= crop:
        return [0]
    n = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``[C, h, w]`` float maps to ``[C, height, width]``."""
    if maps.shape[1:] == (height, width):
        return maps
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()


def _takes_groups(fn: Callable) -> bool:
    try:
        return "groups" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def class_scores(
    heatmaps: HeatmapFn,
    image: Image.Image,
    classes: Sequence[Sequence[str]],
    *,
    mode: str = "resize",
    short_side: int = 448,
    crop: int = 448,
    stride: int = 224,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Per-class score maps ``[num_classes, H, W]`` at ``out_size`` (height, width; default the image's).

    ``resize``: the whole image in one pass (the engine resizes it to its input size, GEM's protocol).
    ``slide``: short side resized to ``short_side``, then ``crop``-pixel windows every ``stride`` pixels,
    overlapping scores averaged (ClearCLIP / TCL protocol).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prompts, owner = flatten_classes(classes)
    height, width = out_size or (image.height, image.width)
    if len(prompts) > len(classes) and _takes_groups(heatmaps):
        plain = heatmaps
        heatmaps = lambda ims, ps: plain(ims, ps, groups=owner.tolist())  # noqa: E731
    if mode == "resize":
        maps = heatmaps([image], prompts)[0]
    else:
        if stride < 1 or crop < 1 or stride > crop:
            raise ValueError(f"need 1 <= stride <= crop, got crop {crop}, stride {stride}")
        scaled = resize_short_side(image, short_side)
        boxes = [
            (x, y, min(x + crop, scaled.width), min(y + crop, scaled.height))
            for y in window_starts(scaled.height, crop, stride)
            for x in window_starts(scaled.width, crop, stride)
        ]
        crops = [scaled.crop(b) for b in boxes]
        total = np.zeros((len(prompts), scaled.height, scaled.width), dtype=np.float32)
        count = np.zeros((scaled.height, scaled.width), dtype=np.float32)
        for (x0, y0, x1, y1), m in zip(boxes, heatmaps(crops, prompts), strict=True):
            total[:, y0:y1, x0:x1] += m
            count[y0:y1, x0:x1] += 1
        maps = total / count
    return resize_maps(
        reduce_synonyms(np.asarray(maps, dtype=np.float32), owner, len(classes)), height, width
    )


def predict_labels(scores: np.ndarray, *, background: bool, bg_threshold: float | None = None) -> np.ndarray:
    """Label map from class scores: argmax; with ``background`` the labels shift by one and label 0 marks
    pixels whose best score is below ``bg_threshold``."""
    best = scores.argmax(0)
    if not background:
        return best.astype(np.uint8 if scores.shape[0] <= 255 else np.int32)
    if bg_threshold is None:
        raise ValueError("a benchmark with a background class needs bg_threshold")
    labels = (best + 1).astype(np.int32)
    labels[scores.max(0) < bg_threshold] = 0
    return labels
