"""Synthetic Label Studio JSON exports (random shapes with known masks) for tests and benchmarks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from groundlabel.ls_format import brush_rle_encode, new_region_id

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/><Label value="dog"/><Label value="person"/>
  </PolygonLabels>
  <BrushLabels name="brush" toName="image">
    <Label value="cat"/><Label value="dog"/><Label value="person"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image">
    <Label value="cat"/><Label value="dog"/><Label value="person"/>
  </RectangleLabels>
  <TextArea name="expr" toName="image" perRegion="true"/>
</View>"""

LABELS = ("cat", "dog", "person")


def random_polygon(rng: np.random.Generator, width: int, height: int, n: int = 8) -> list[list[float]]:
    """A star-shaped polygon in Label Studio percent coordinates."""
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    radius = rng.uniform(0.05, 0.2) * min(width, height)
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.5, 1.0, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, width)
    ys = np.clip(cy + radii * np.sin(angles), 0, height)
    return [
        [round(float(x) * 100 / width, 4), round(float(y) * 100 / height, 4)]
        for x, y in zip(xs, ys, strict=True)
    ]


def random_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A blobby boolean mask: a union of two ellipses."""
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), bool)
    for _ in range(2):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        ax, ay = rng.uniform(0.04, 0.15) * width, rng.uniform(0.04, 0.15) * height
        mask |= ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    return mask


def polygon_result(
    points: list[list[float]],
    label: str,
    width: int,
    height: int,
    rid: str | None = None,
    from_name: str = "poly",
) -> dict[str, Any]:
    """A ``polygonlabels`` result."""
    return {
        "id": rid or new_region_id(),
        "from_name": from_name,
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": [label]},
    }


def brush_result(
    rle: list[int], label: str, width: int, height: int, rid: str | None = None, from_name: str = "brush"
) -> dict[str, Any]:
    """A ``brushlabels`` result from Label Studio RLE."""
    return {
        "id": rid or new_region_id(),
        "from_name": from_name,
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def rectangle_result(
    x: float,
    y: float,
    w: float,
    h: float,
    label: str,
    width: int,
    height: int,
    rotation: float = 0.0,
    rid: str | None = None,
) -> dict[str, Any]:
    """A ``rectanglelabels`` result (percent coordinates)."""
    return {
        "id": rid or new_region_id(),
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def text_result(text: str | list[str], rid: str | None = None, from_name: str = "expr") -> dict[str, Any]:
    """A ``textarea`` result: per-region when ``rid`` is a region's id, per-task otherwise."""
    return {
        "id": rid or new_region_id(),
        "from_name": from_name,
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [text] if isinstance(text, str) else list(text)},
    }


def make_export(
    n_tasks: int,
    *,
    width: int = 640,
    height: int = 480,
    regions_per_task: int = 3,
    brush_every: int = 2,
    expressions: bool = True,
    seed: int = 0,
    n_masks: int = 16,
) -> list[dict[str, Any]]:
    """A Label Studio JSON export of ``n_tasks`` tasks with polygon and brush regions.

    Every ``brush_every``-th region is a brush mask (drawn from ``n_masks`` pre-encoded masks, since
    Label Studio's RLE encoder is slow); the others are polygons. With ``expressions`` each region
    gets a per-region expression.
    """
    rng = np.random.default_rng(seed)
    masks = [brush_rle_encode(random_mask(rng, width, height)) for _ in range(n_masks if brush_every else 0)]
    tasks = []
    k = 0
    for t in range(n_tasks):
        results = []
        for _ in range(regions_per_task):
            label = LABELS[int(rng.integers(len(LABELS)))]
            if brush_every and k % brush_every == brush_every - 1:
                res = brush_result(masks[int(rng.integers(len(masks)))], label, width, height)
            else:
                res = polygon_result(random_polygon(rng, width, height), label, width, height)
            k += 1
            results.append(res)
            if expressions:
                results.append(text_result(f"the {label} number {k}", rid=res["id"]))
        tasks.append(
            {
                "id": t + 1,
                "data": {"image": f"/data/local-files/?d=images/img_{t + 1:06d}.jpg"},
                "annotations": [
                    {
                        "id": t + 1,
                        "result": results,
                        "was_cancelled": False,
                        "ground_truth": False,
                        "created_at": "2024-01-01T00:00:00Z",
                        "updated_at": "2024-01-01T00:00:00Z",
                    }
                ],
                "predictions": [],
            }
        )
    return tasks


def make_corrected_export(
    n_tasks: int,
    *,
    width: int = 640,
    height: int = 480,
    regions_per_task: int = 3,
    brush_every: int = 2,
    seed: int = 0,
    n_masks: int = 16,
    model_version: str = "gem-ViT-B-16-openai-cfg0000",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A Label Studio JSON export of ``n_tasks`` pre-labelled and corrected tasks, and what the annotators
    did: ``(tasks, {"kept", "edited", "deleted", "added"})``.

    Each task holds a prediction of ``regions_per_task`` regions (every ``brush_every``-th a brush mask, the
    others polygons) and an annotation that started from it (``parent_prediction``, a ``lead_time``): its
    first region kept, its second edited (a brush mask swapped for a grown one, a polygon moved), its third
    deleted on every other task, and a small brush region added in a corner on every third task. Region ids
    are kept as Label Studio keeps them.
    """
    rng = np.random.default_rng(seed)
    pool = [random_mask(rng, width, height) for _ in range(n_masks if brush_every else 0)]
    masks = [brush_rle_encode(m) for m in pool]
    grown = [brush_rle_encode(m | np.roll(m, 6, axis=1)) for m in pool]
    corner = np.zeros((height, width), bool)
    corner[:8, :8] = True  # what annotators add: overlaps no predicted region
    added = brush_rle_encode(corner)
    counts = dict.fromkeys(("kept", "edited", "deleted", "added"), 0)
    tasks = []
    k = 0
    for t in range(n_tasks):
        predicted, annotated = [], []
        for r in range(regions_per_task):
            label = LABELS[int(rng.integers(len(LABELS)))]
            pick = int(rng.integers(len(masks))) if masks else 0
            brush = brush_every and k % brush_every == brush_every - 1
            k += 1
            if brush:
                region = brush_result(masks[pick], label, width, height)
            else:
                region = polygon_result(random_polygon(rng, width, height), label, width, height)
            predicted.append(region)
            if r == 0:
                annotated.append(region)
                counts["kept"] += 1
            elif r == 1:
                edited = {**region, "value": dict(region["value"])}
                if brush:
                    edited["value"]["rle"] = grown[pick]
                else:
                    edited["value"]["points"] = [[x + 1.0, y] for x, y in region["value"]["points"]]
                annotated.append(edited)
                counts["edited"] += 1
            elif t % 2 == 0:
                counts["deleted"] += 1
            else:
                annotated.append(region)
                counts["kept"] += 1
        if t % 3 == 0:
            annotated.append(brush_result(added, LABELS[t % len(LABELS)], width, height, rid=f"new{t}"))
            counts["added"] += 1
        stamp = f"2024-01-01T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z"
        tasks.append(
            {
                "id": t + 1,
                "data": {"image": f"/data/local-files/?d=images/img_{t + 1:06d}.jpg"},
                "annotations": [
                    {
                        "id": t + 1,
                        "result": annotated,
                        "was_cancelled": False,
                        "ground_truth": False,
                        "lead_time": round(float(rng.uniform(5, 60)), 3),
                        "parent_prediction": 100_000 + t,
                        "created_at": stamp,
                        "updated_at": stamp,
                    }
                ],
                "predictions": [
                    {
                        "id": 100_000 + t,
                        "model_version": model_version,
                        "score": 0.5,
                        "result": predicted,
                        "created_at": "2023-12-31T00:00:00Z",
                    }
                ],
            }
        )
    return tasks, counts
