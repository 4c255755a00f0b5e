"""A small generated referring dataset in RefCOCO format: coloured shapes with expressions such as "the red
circle on the left".

The shapes lie on a textured background. For smoke tests of ``train-lavt`` / ``eval-lavt`` and for
checking that a model learns; it writes exactly the files the RefCOCO reader expects."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from workers.models.lavt.data import IMAGE_SUBDIR

COLOURS = {"red": (215, 35, 35), "green": (30, 170, 60), "blue": (40, 70, 225), "yellow": (235, 205, 30)}
SHAPES = {"circle": 1, "square": 2, "triangle": 3}  # shape -> COCO category id
TEMPLATES = (
    "the {colour} {shape} on the {side}",
    "{colour} {shape}",
    "the {shape} on the {side}",
    "{side} {colour} thing",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    """Every WordPiece token the generated expressions use, specials first ([PAD] = 0)."""
    words = {"the", "on", "left", "right", "thing", *COLOURS, *SHAPES}
    return [*SPECIAL_TOKENS, *sorted(words)]


def write_vocab(path: str | Path) -> Path:
    """Write a BERT ``vocab.txt`` for the generated expressions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocabulary()) + "\n")
    return path


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "circle":
        return [
            (cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24))
            for k in range(24)
        ]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(70, 170, size=(4, 4, 3))
    smooth = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32
    )
    grey = smooth.mean(axis=2, keepdims=True)
    texture = 0.6 * grey + 0.4 * smooth + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(texture, 0, 255).astype(np.uint8)


def make_dataset(
    root: str | Path,
    *,
    images: int = 60,
    val_images: int = 16,
    size: int = 96,
    seed: int = 0,
    dataset: str = "refcoco",
    split_by: str = "unc",
) -> Path:
    """Write ``images`` training and ``val_images`` validation images (two objects each, one per half,
    every object a ref with two expressions) under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    image_dir = root / IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    coco_images, annotations, refs = [], [], []
    sent_id = 0
    for index in range(images + val_images):
        image_id = index + 1
        split = "train" if index < images else "val"
        canvas = Image.fromarray(_background(rng, size))
        draw = ImageDraw.Draw(canvas)
        colours = pyrng.sample(list(COLOURS), 2)
        for side_index, side in enumerate(("left", "right")):
            shape = pyrng.choice(list(SHAPES))
            r = pyrng.uniform(0.11, 0.17) * size
            cx = pyrng.uniform(r + 2, size / 2 - r - 2) + side_index * size / 2
            cy = pyrng.uniform(r + 2, size - r - 2)
            points = _polygon(shape, cx, cy, r)
            draw.polygon(points, fill=COLOURS[colours[side_index]])
            ann_id = len(annotations) + 1
            flat = [round(v, 2) for p in points for v in p]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES[shape],
                    "segmentation": [flat],
                    "area": float(
                        0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
                    ),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                }
            )
            templates = pyrng.sample(TEMPLATES, 2)
            sentences = []
            for template in templates:
                raw = template.format(colour=colours[side_index], shape=shape, side=side)
                sentences.append({"tokens": raw.split(), "raw": raw, "sent": raw, "sent_id": sent_id})
                sent_id += 1
            refs.append(
                {
                    "ref_id": len(refs),
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES[shape],
                    "split": split,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                }
            )
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        canvas.save(image_dir / file_name, quality=95)
        coco_images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in SHAPES.items()]
    instances = {"images": coco_images, "annotations": annotations, "categories": categories}
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    with open(root / dataset / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    return root
