"""Region conversion gives the same regions as the implementation before its speed-up.

``tests/assets/regions_reference.json`` holds what ``regions_from_scores`` returned, before the
conversion worked per label on the label's bounding box with compiled passes, for fixed score maps:
every control, 1, 5 and 20 labels, synonyms, NaN and out-of-range scores, per-region options, exact
and simplified polygons, and images whose maps come at another size. Region ids are random and left
out. Regenerate (only on purpose) with ``python tests/test_regions_reference.py``.

Recorded with OpenCV 4.12. OpenCV 4.13 changed ``approxPolyDP``: one simplified 20-label polygon keeps
two more vertices, so ``PolygonLabels-20-0`` and ``-20-2`` are the locked OpenCV's
(``requirements/all.txt``); every other case, exact polygons included, is unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from groundlabel.spec import ControlSpec, LabelingSpec  # noqa: E402
from workers.regions import regions_from_scores  # noqa: E402

ASSET = Path(__file__).resolve().parent / "assets" / "regions_reference.json"
CONTROLS = ("PolygonLabels", "BrushLabels", "RectangleLabels", "KeyPointLabels")
OPTIONS: dict[str, list[dict[str, str]]] = {
    "PolygonLabels": [{}, {"polygon_tolerance": "0"}, {"polygon_tolerance": "3", "min_hole_area": "20"}],
    "BrushLabels": [{}, {"brush_per_region": "true"}],
    "RectangleLabels": [{}, {"min_region_area": "30"}],
    "KeyPointLabels": [{}, {"keypoint_per_region": "true"}],
}


def maps_for(labels: int, width: int, height: int, seed: int, *, grid: int = 9) -> dict[str, np.ndarray]:
    """Smooth random maps (a coarse grid upsampled bilinearly), like GEM's."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(labels):
        coarse = cv2.GaussianBlur(rng.random((grid, grid)).astype(np.float32), (0, 0), 1.0)
        coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min() + 1e-9)
        out[f"l{i}"] = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def cases() -> list[dict[str, Any]]:
    """The fixed inputs: ``(name, spec, maps, width, height, threshold)`` as dicts."""
    out = []
    for labels, (width, height), seed in ((1, (97, 61), 1), (5, (160, 120), 2), (20, (211, 143), 3)):
        maps = maps_for(labels, width, height, seed)
        names = list(maps)
        for kind in CONTROLS:
            for k, options in enumerate(OPTIONS[kind]):
                control = ControlSpec("c", kind, "image", names, {n: [n] for n in names}, options)
                threshold = 0.5 if labels > 1 else 0.7
                out.append(
                    dict(
                        name=f"{kind}-{labels}-{k}",
                        controls=[control],
                        maps=maps,
                        width=width,
                        height=height,
                        threshold=threshold,
                    )
                )
    # synonyms (a label's score is the max of its prompts), NaN / inf scores, maps at another size
    maps = {f"p{i}": m for i, m in enumerate(maps_for(6, 120, 90, 4).values())}
    maps["p0"][10:20, 10:30] = np.nan
    maps["p1"][40:50, 60:70] = np.inf
    maps["p2"][0:5, :] = -np.inf
    prompts = {"a": ["p0", "p1"], "b": ["p2"], "c": ["p3", "p4", "p5"]}
    for kind in CONTROLS:
        control = ControlSpec("s", kind, "image", list(prompts), prompts, {})
        out.append(
            dict(name=f"{kind}-synonyms", controls=[control], maps=maps, width=120, height=90, threshold=0.45)
        )
        out.append(
            dict(name=f"{kind}-resized", controls=[control], maps=maps, width=180, height=100, threshold=0.45)
        )
    return out


def strip(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "id"} for r in results]


def run(case: dict[str, Any]) -> dict[str, Any]:
    spec = LabelingSpec("image", "image", case["controls"])
    results, score = regions_from_scores(
        spec, case["maps"], width=case["width"], height=case["height"], threshold=case["threshold"]
    )
    return {"results": strip(results), "score": score}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(ASSET.read_text())


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["name"])
def test_same_regions_as_before(case: dict[str, Any], reference: dict[str, Any]) -> None:
    assert run(case) == reference[case["name"]]


def test_reference_covers_every_case(reference: dict[str, Any]) -> None:
    assert set(reference) == {c["name"] for c in cases()}
    assert sum(len(v["results"]) for v in reference.values()) > 200  # enough regions to compare


if __name__ == "__main__":
    ASSET.write_text(json.dumps({c["name"]: run(c) for c in cases()}, separators=(",", ":")) + "\n")
    print(f"written {ASSET}")
