"""Offline quality of ``refine=sam`` and of SAM clicks, on the held-out generated scenes.

The tiny CLIP (``tests/assets/tiny_clip.pt``, trained on captions only) gives GEM's coarse maps of the
object colours; the tiny SAM (``tests/assets/tiny_sam.pt``, ``groundlabel train-tiny-sam``, trained on
other scenes of the same generator) sharpens them. Rows:

- ``gem``, ``gem +pamr``, ``gem +sam``, ``gem +pamr +sam``: the label map (background below a threshold
  chosen per row on validation scenes: for a ``+sam`` row, the threshold whose refined map scores best
  there), scored by mIoU (background and the seven colours) and the mean boundary F-score at a 2-pixel
  tolerance;
- ``click → sam`` and ``click → gem component``: one positive click at each visible object's centre (the
  point deepest inside it), the object's mask from SAM, or from GEM's map of the object's colour
  (:func:`workers.pipeline.click_mask`), scored per object by IoU and boundary F.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.evaluation.metrics import BoundaryF, ConfusionMatrix, boundary_f
from workers.evaluation.quality import BACKGROUND_PROMPTS, EVAL_SEED, THRESHOLDS, VALIDATION_SEED
from workers.evaluation.scenes import COLOURS, Scene, instance_masks, make_scenes

TOLERANCE = 2.0  # boundary F tolerance in pixels
#: ``refine=sam``'s rule (``min_score``, ``min_iou``) is tuned on scenes of this seed (not the held-out ones).
TUNING_SEED = 555_001
MIN_SCORES: tuple[float, ...] = (0.0, 0.3, 0.4, 0.5, 0.6)


@dataclass
class Row:
    """One method's scores."""

    name: str
    miou: float
    boundary_f: float
    scenes: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {"method": self.name, "mIoU": self.miou, "boundary_F": self.boundary_f, "scenes": self.scenes,
                "seconds": self.seconds, **self.extra}  # fmt: skip


def tiny_gem(checkpoint: str, *, temperature: float | None, pamr: bool, cpu_precision: str = "fp32") -> Any:
    """GEM on the tiny CLIP, with the offline quality test's options (PAMR at full size when asked), in
    ``cpu_precision`` (``fp32``, ``bf16`` or ``auto``: ``GROUNDLABEL_CPU_PRECISION``)."""
    from workers.evaluation.tiny_clip import load_tiny_clip
    from workers.models.gem import GemConfig, GemEngine

    model, tokenizer, cfg = load_tiny_clip(checkpoint)
    options: dict[str, Any] = {
        "model_name": "tiny-clip", "pretrained": None, "image_size": cfg.image_size, "device": "cpu",
        "background_prompts": BACKGROUND_PROMPTS, "batch_size": 32, "method": "gem",
        "gem_depth": min(7, cfg.vision_layers + 1), "ss_attn_temp": temperature,
        "cpu_precision": cpu_precision,
    }  # fmt: skip
    if pamr:
        options.update(refine="pamr", pamr_scale=1.0)
    return GemEngine(GemConfig(**options), clip_model=model, tokenizer=tokenizer)


def tiny_sam(checkpoint: str, cpu_precision: str = "fp32", **rule: float) -> Any:
    """The tiny SAM engine (CPU, its image encoder in ``cpu_precision``); ``rule``: ``min_iou`` /
    ``min_score`` of ``refine=sam`` (else defaults)."""
    from workers.models.sam import SamConfig, SamEngine

    return SamEngine(SamConfig(model=checkpoint, device="cpu", cpu_precision=cpu_precision, **rule))


def label_map(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Background (0) where the best colour scores below ``threshold``, else 1 + the best colour."""
    labels = scores.argmax(0) + 1
    labels[scores.max(0) < threshold] = 0
    return labels


def best_threshold(
    maps: Sequence[np.ndarray], scenes: Sequence[Scene], refine: Callable[..., np.ndarray] | None = None
) -> float:
    """The background threshold of :data:`THRESHOLDS` with the best mIoU on ``scenes``; ``refine``
    (``refine(scene, labels, scores)``): the label map it gives is scored instead."""
    k = len(COLOURS) + 1
    best, best_t = -1.0, THRESHOLDS[0]
    for t in THRESHOLDS:
        cm = ConfusionMatrix(k)
        for scores, scene in zip(maps, scenes, strict=True):
            labels = label_map(scores, t)
            cm.update(labels if refine is None else refine(scene, labels, scores), scene.colour_labels)
        miou = cm.summary()["mIoU"]
        if miou > best:
            best, best_t = miou, t
    return best_t


def score_label_maps(
    name: str, preds: Sequence[np.ndarray], scenes: Sequence[Scene], seconds: float, **extra: Any
) -> Row:
    """mIoU and mean boundary F of label maps against the scenes' colour labels."""
    k = len(COLOURS) + 1
    cm, bf = ConfusionMatrix(k), BoundaryF(k, TOLERANCE, ignore=(0,))
    for pred, scene in zip(preds, scenes, strict=True):
        cm.update(pred, scene.colour_labels)
        bf.update(pred, scene.colour_labels)
    return Row(name, cm.summary()["mIoU"], bf.mean(), len(scenes), seconds, extra)


def evaluate_refinement(
    clip_checkpoint: str,
    sam_checkpoint: str,
    *,
    scenes: int = 200,
    validation_scenes: int = 100,
    temperature: float | None = None,
    seed: int = EVAL_SEED,
    cpu_precision: str = "fp32",
    **rule: float,
) -> list[Row]:
    """The label-map rows (module docstring) on ``scenes`` held-out scenes; thresholds are chosen on
    ``validation_scenes`` scenes of their own seed. ``temperature``: GEM's inverse temperature; ``rule``:
    ``min_iou`` / ``min_score`` of ``refine=sam`` (else its defaults); ``cpu_precision``: GEM's and SAM's
    arithmetic."""
    from workers.models.sam.refine import refine_label_map

    held = make_scenes(scenes, seed, 48)
    val = make_scenes(validation_scenes, VALIDATION_SEED, 48)
    names = list(COLOURS)
    sam = tiny_sam(sam_checkpoint, cpu_precision, **rule)
    rows = []

    def refine(scene: Scene, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return refine_label_map(sam, scene.image, labels, scores)

    for pamr in (False, True):
        gem = tiny_gem(clip_checkpoint, temperature=temperature, pamr=pamr, cpu_precision=cpu_precision)
        val_maps = gem.heatmaps([s.image for s in val], names)
        start = time.perf_counter()
        maps = gem.heatmaps([s.image for s in held], names)
        coarse_seconds = time.perf_counter() - start
        base = "gem +pamr" if pamr else "gem"
        for name, refined in ((base, None), (f"{base} +sam", refine)):
            t = best_threshold(val_maps, val, refined)
            start = time.perf_counter()
            preds = [label_map(m, t) for m in maps]
            if refined is not None:
                preds = [refined(s, p, m) for s, p, m in zip(held, preds, maps, strict=True)]
            seconds = coarse_seconds + time.perf_counter() - start
            rows.append(score_label_maps(name, preds, held, seconds, threshold=t))
    return rows


def tune_refinement(
    clip_checkpoint: str,
    sam_checkpoint: str,
    *,
    min_scores: Sequence[float] = MIN_SCORES,
    min_ious: Sequence[float] = (0.0, 0.5),
    scenes: int = 100,
    validation_scenes: int = 100,
    temperature: float | None = None,
) -> list[dict]:
    """``refine=sam``'s rule on the tuning scenes (:data:`TUNING_SEED`, neither held-out nor validation):
    the ``+sam`` rows for every ``min_iou`` × ``min_score`` (thresholds still chosen on validation)."""
    out = []
    for min_iou in min_ious:
        for min_score in min_scores:
            rows = evaluate_refinement(
                clip_checkpoint, sam_checkpoint, scenes=scenes, validation_scenes=validation_scenes,
                temperature=temperature, seed=TUNING_SEED, min_iou=min_iou, min_score=min_score,
            )  # fmt: skip
            for r in rows:
                out.append({"min_iou": min_iou, "min_score": min_score, **r.as_dict()})
    return out


def object_clicks(scene: Scene) -> list[tuple[np.ndarray, int, tuple[float, float]]]:
    """Each visible object of ``scene``: its mask, its colour label and its centre (the deepest point)."""
    from workers.models.sam.refine import interior_point

    out = []
    for mask in instance_masks(scene):
        colour = int(np.bincount(scene.colour_labels[mask]).argmax())
        out.append((mask, colour, interior_point(mask)))
    return out


def evaluate_clicks(
    clip_checkpoint: str,
    sam_checkpoint: str,
    *,
    scenes: int = 200,
    temperature: float | None = None,
    threshold: float = 0.5,
    seed: int = EVAL_SEED,
    cpu_precision: str = "fp32",
) -> list[Row]:
    """``click → sam`` and ``click → gem component`` (module docstring): mean IoU and mean boundary F over
    the objects of ``scenes`` held-out scenes (GEM and SAM in ``cpu_precision``)."""
    from groundlabel.ls_format import Click
    from workers.models.sam.engine import Prompt
    from workers.models.sam.refine import mask_iou
    from workers.pipeline import click_mask

    held = make_scenes(scenes, seed, 48)
    names = list(COLOURS)
    sam = tiny_sam(sam_checkpoint, cpu_precision)
    gem = tiny_gem(clip_checkpoint, temperature=temperature, pamr=False, cpu_precision=cpu_precision)
    objects = [object_clicks(s) for s in held]
    scores: dict[str, tuple[list[float], list[float]]] = {
        "click → sam": ([], []),
        "click → gem component": ([], []),
    }
    seconds = {"click → sam": 0.0, "click → gem component": 0.0}
    maps = gem.heatmaps([s.image for s in held], names)
    for scene, objs, colour_maps in zip(held, objects, maps, strict=True):
        for mask, colour, (x, y) in objs:
            start = time.perf_counter()
            ((candidates, _),) = sam.segment(scene.image, [Prompt([(x, y)], [1])], multimask=True)
            seconds["click → sam"] += time.perf_counter() - start
            start = time.perf_counter()
            click = Click("keypointlabels", names[colour - 1], None, x / 48 * 100, y / 48 * 100)
            component = click_mask(colour_maps[colour - 1], click, threshold)
            seconds["click → gem component"] += time.perf_counter() - start
            for name, pred in (("click → sam", candidates[0]), ("click → gem component", component)):
                scores[name][0].append(mask_iou(pred, mask))
                scores[name][1].append(boundary_f(pred, mask, TOLERANCE) or 0.0)
    count = sum(len(o) for o in objects)
    return [
        Row(
            name,
            float(np.mean(i) * 100),
            float(np.mean(b) * 100),
            len(held),
            seconds[name],
            {"objects": count},
        )
        for name, (i, b) in scores.items()
    ]


def format_rows(rows: Sequence[Row]) -> str:
    """A plain-text table."""
    w = max(len("method"), *(len(r.name) for r in rows))
    lines = [
        f"{'method':<{w}} | mIoU  | boundary F @{TOLERANCE:g}px | s/scene",
        f"{'-' * w}-+-------+----------------+--------",
    ]
    for r in rows:
        lines.append(
            f"{r.name:<{w}} | {r.miou:5.2f} | {r.boundary_f:14.2f} | {r.seconds / max(r.scenes, 1):.4f}"
        )
    return "\n".join(lines)
