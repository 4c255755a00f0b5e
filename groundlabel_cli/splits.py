"""What training and calibration count and how they split a project: the annotations that count, and the
split of an exported COCO folder by image (the RefCOCO export's seeded hash, so the same images stay held
out as the project grows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def annotation_count(tasks: list[dict[str, Any]]) -> int:
    """Annotations of the export that count for training (cancelled ones do not)."""
    return sum(1 for task in tasks for a in task.get("annotations") or [] if not a.get("was_cancelled"))


def split_coco_images(data_root: Path, holdout: float, seed: int) -> dict[int, str]:
    """``{COCO image id: split}`` of an exported COCO folder, by each image's Label Studio reference, as
    the RefCOCO export splits the images (the same images stay held out as the project grows)."""
    import json

    from exporters.refcoco import assign_splits

    coco = json.loads((data_root / "instances.json").read_text(encoding="utf-8"))
    keys = {
        int(img["id"]): str((img.get("labelstudio") or {}).get("image") or img["file_name"])
        for img in coco["images"]
    }
    splits = assign_splits(sorted(set(keys.values())), "unc", (1.0 - holdout, holdout, 0.0, 0.0), seed)
    return {image_id: splits[key] for image_id, key in keys.items()}
