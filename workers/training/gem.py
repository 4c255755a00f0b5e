"""Distilling a project's GEM backbone on its own images (CLIPSelf), and promoting it if better.

For projects without referring expressions. The dataset is a COCO folder as the exporter writes it
(``instances.json``, ``images/``); the training job splits its images exactly as its RefCOCO export
would (``exporters.refcoco.assign_splits`` with the held-out fraction and seed), so the same images stay
held out as the project grows. The CLIP behind GEM (the project's promoted
version, else the workers' ``GROUNDLABEL_GEM_*`` weights) is distilled on the training images with
``groundlabel distill``'s code (:func:`workers.models.clipself.distill.distill`; no mask is used), and
the current and the distilled model are scored on the held-out images with ``eval-gem``'s protocol for
class prompts (:func:`workers.evaluation.inference.class_scores`, background where no class scores above
:data:`BG_THRESHOLD`, mmsegmentation's mIoU) against the annotated masks of the label config's brush and
polygon labels. The new version (the distilled CLIP's state dict) is stored either way and promoted only
when its held-out mIoU beats the current one's by more than ``GROUNDLABEL_TRAIN_MIN_GAIN`` (a fraction:
0.01 is one mIoU point). The distillation runs ``GROUNDLABEL_TRAIN_EPOCHS`` passes over the training
images in batches of ``GROUNDLABEL_TRAIN_BATCH`` at ``GROUNDLABEL_TRAIN_LR``, at GEM's input size.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore
from groundlabel.settings import EngineSettings
from workers.training.lavt import HELDOUT_SPLIT, TRAIN_SPLIT, JobOutcome, Progress, Recipe, settle

log = logging.getLogger(__name__)

#: ``decode(segmentation, width, height)``: a COCO segmentation as a boolean mask (the exporters' reader,
#: passed in by the training job).
Decode = Callable[[Any, int, int], np.ndarray]
#: The label-config controls whose labels are GEM's classes (masks a score map can be compared with).
MASK_CONTROLS = ("BrushLabels", "PolygonLabels")
#: Below this best class score a pixel is background (``eval-gem``'s default ``--bg-threshold``).
BG_THRESHOLD = 0.5


@dataclass
class GemOutcome(JobOutcome):
    """What a distillation job did (metrics: mIoU), and how many images it trained on and was scored on."""

    train_images: int
    heldout_images: int
    kind: str = "gem"


@dataclass
class HeldOut:
    """The held-out images with their label maps (0 background, ``k`` the k-th class, 255 ignored)."""

    images: list[Path]
    labels: list[np.ndarray]


def mask_classes(label_config: str | None) -> list[tuple[str, ...]]:
    """GEM's classes of a label config: each brush or polygon label with its prompts (synonyms), in
    config order; :class:`UserError` when there is none."""
    from groundlabel.spec import read_spec

    spec = read_spec(label_config or "")
    seen: dict[str, tuple[str, ...]] = {}
    for control in spec.controls:
        if control.type in MASK_CONTROLS:
            for label in control.labels:
                seen.setdefault(label, tuple(control.prompts.get(label) or [label]))
    if not seen:
        raise UserError(
            "the project's label config has no BrushLabels or PolygonLabels label: GEM's distillation is "
            "scored on annotated masks"
        )
    return [(name, *(p for p in prompts if p != name)) for name, prompts in seen.items()]


def label_map(
    coco_image: dict[str, Any],
    annotations: Sequence[dict[str, Any]],
    class_of: dict[int, int],
    decode: Decode,
) -> np.ndarray:
    """The image's annotated masks as a label map (``class_of``: category id → label; later regions are
    painted over earlier ones; pixels of a category outside the classes are ignored)."""
    height, width = int(coco_image["height"]), int(coco_image["width"])
    out = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        mask = decode(ann["segmentation"], width, height).astype(bool)
        out[mask] = class_of.get(int(ann["category_id"]), 255)
    return out


def read_dataset(
    data_root: str | Path, classes: Sequence[Sequence[str]], splits: dict[int, str], decode: Decode
) -> tuple[list[Path], HeldOut]:
    """The training images and the held-out part of an exported COCO folder (``splits``: COCO image id →
    split; ``decode(segmentation, width, height)``: a COCO segmentation as a boolean mask)."""
    root = Path(data_root)
    path = root / "instances.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist (export the project as COCO first)")
    coco = json.loads(path.read_text(encoding="utf-8"))
    names = {c[0]: i + 1 for i, c in enumerate(classes)}
    class_of = {int(c["id"]): names[c["name"]] for c in coco["categories"] if c["name"] in names}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    train, heldout = [], HeldOut([], [])
    for img in sorted(coco["images"], key=lambda i: i["id"]):
        file = root / "images" / img["file_name"]
        if not file.is_file():
            file = root / img["file_name"]
        split = splits.get(int(img["id"]))
        if split == HELDOUT_SPLIT:
            anns = [a for a in by_image.get(img["id"], []) if int(a["category_id"]) in class_of]
            if not anns:  # an image without any mask of the classes says nothing about them
                continue
            heldout.images.append(file)
            heldout.labels.append(label_map(img, by_image.get(img["id"], []), class_of, decode))
        elif split == TRAIN_SPLIT:
            train.append(file)
    return train, heldout


def evaluate(engine: Any, heldout: HeldOut, classes: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``eval-gem``'s scores of ``engine`` on the held-out images: background plus the classes."""
    from PIL import Image

    from workers.evaluation.inference import class_scores, predict_labels
    from workers.evaluation.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(len(classes) + 1)
    objects = ConfusionMatrix(len(classes))  # the annotated pixels only, argmax over the classes
    for file, gt in zip(heldout.images, heldout.labels, strict=True):
        with Image.open(file) as im:
            image = im.convert("RGB")
        scores = class_scores(engine.heatmaps, image, classes, out_size=gt.shape)
        matrix.update(np.asarray(predict_labels(scores, background=True, bg_threshold=BG_THRESHOLD)), gt)
        objects.update(predict_labels(scores, background=False), np.where(gt == 0, 255, gt - 1))
    summary = matrix.summary(["background", *(c[0] for c in classes)])
    fg = objects.summary([c[0] for c in classes])
    return {
        **summary,
        "fg_mIoU": fg["mIoU"],
        "fg_per_class": fg["per_class"],
        "images": len(heldout.images),
        "bg_threshold": BG_THRESHOLD,
    }


def current_clip(store: ModelStore, project: str, engines: EngineSettings) -> tuple[Any, str]:
    """What the project's GEM serves: ``(GemConfig with its weights, its version)``."""
    from workers.engines import gem_config
    from workers.models.gem.weights import weights_label

    config = gem_config(engines, register=True)
    promoted = store.served_trained(project)  # a promoted calibration's is the version under it
    if promoted is not None and promoted.kind == "gem":
        return replace(config, pretrained=str(store.weights_path(promoted))), promoted.name
    return config, config.model_version(weights_label(config.pretrained))


def distill_project(
    data_root: str | Path,
    *,
    store: ModelStore,
    project: str,
    annotation_count: int,
    classes: Sequence[Sequence[str]],
    engines: EngineSettings,
    recipe: Recipe,
    splits: dict[int, str],
    decode: Decode,
    work_dir: str | Path,
    on_progress: Progress | None = None,
    progress_bar: bool = True,
    calibrated: Callable[[Any], float] | None = None,
) -> GemOutcome:
    """Distil the project's current GEM CLIP on the training images of ``data_root``, store the result,
    promote it if its held-out mIoU is better (see the module docstring). ``calibrated(engine)``: the
    held-out IoU of a GEM engine under the project's calibrated settings; when given (the project is served
    calibrated), the current and the distilled GEM are compared on it instead."""
    from workers.images import decode_image
    from workers.models.clipself.distill import DistillConfig, distill
    from workers.models.device import resolve_device
    from workers.models.gem import GemEngine
    from workers.models.gem.weights import load_clip

    report = on_progress or (lambda _update: None)
    train_files, heldout = read_dataset(data_root, classes, splits, decode)
    if not train_files or not heldout.images:
        raise UserError(
            f"the project has {len(train_files)} training images and {len(heldout.images)} held-out images "
            "with masks after the split by image; both parts need at least one (annotate more images)"
        )
    config, parent = current_clip(store, project, engines)
    log.info(
        "project %s: distilling %s on %d images, %d held out (%d annotations)",
        project,
        parent,
        len(train_files),
        len(heldout.images),
        annotation_count,
    )
    report({"stage": "evaluating the current model", "parent": parent})
    base = evaluate(GemEngine(config), heldout, classes)

    steps_per_epoch = math.ceil(len(train_files) / recipe.batch_size)
    steps = recipe.epochs * steps_per_epoch
    size = max(config.input_size)
    distill_config = DistillConfig(
        steps=steps,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        image_size=size,
        seed=recipe.seed,
    )
    report({"stage": "training", "epoch": 0, "epochs": recipe.epochs, "base": base})
    epoch_losses: list[float] = []

    def step_done(step: int, loss: float) -> None:
        epoch_losses.append(loss)
        if (step + 1) % steps_per_epoch:
            return
        epoch, mean = (step + 1) // steps_per_epoch, sum(epoch_losses) / len(epoch_losses)
        epoch_losses.clear()
        log.info("project %s: epoch %d/%d distillation loss %.4f", project, epoch, recipe.epochs, mean)
        report({"stage": "training", "epoch": epoch, "epochs": recipe.epochs, "loss": mean})

    device = resolve_device(config.device)
    loaded = load_clip(config.arch, config.pretrained, config.cache_dir, hub=config.hub)
    out = Path(work_dir) / "distilled.safetensors"  # the store keeps safetensors
    start = time.perf_counter()
    _, losses = distill(
        loaded.model,
        lambda i: decode_image(train_files[i]),
        len(train_files),
        distill_config,
        device=device,
        out=out,
        progress=progress_bar,
        on_step=step_done,
    )
    seconds = time.perf_counter() - start
    del loaded
    report({"stage": "evaluating the new model"})
    new = evaluate(GemEngine(replace(config, pretrained=str(out))), heldout, classes)
    better = new["mIoU"] / 100 > base["mIoU"] / 100 + recipe.min_gain  # mIoU in percent, the gain in [0, 1]
    comparison = f"held-out mIoU {new['mIoU']:.2f} vs {base['mIoU']:.2f} (percent) for {parent}"
    if calibrated is not None:  # served calibrated: both answer with the calibrated settings
        base["calibrated_IoU"] = calibrated(GemEngine(config))
        new["calibrated_IoU"] = calibrated(GemEngine(replace(config, pretrained=str(out))))
        better = new["calibrated_IoU"] > base["calibrated_IoU"] + recipe.min_gain
        comparison = (
            f"held-out IoU with the calibrated settings {new['calibrated_IoU']:.4f} vs "
            f"{base['calibrated_IoU']:.4f} for {parent}"
        )
    k = max(1, min(20, len(losses) // 5))
    version = store.add(
        project=project,
        kind="gem",
        variant=config.arch,
        weights=out,
        parent=parent,
        annotation_count=annotation_count,
        config={"model_name": config.arch, "method": config.method, "distill": asdict(distill_config)},
        metrics={
            "base": base,
            "new": new,
            "classes": [list(c) for c in classes],
            "train_images": len(train_files),
            "heldout_images": len(heldout.images),
            "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k,
            "train_seconds": seconds,
            "recipe": asdict(recipe),
        },
    )
    reason = settle(store, project, version.name, parent, better, comparison, recipe.min_gain)
    return GemOutcome(version.name, parent, better, reason, base, new, len(train_files), len(heldout.images))
