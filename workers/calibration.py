"""Calibration from corrections: per label, the threshold and the way of answering (engine, refinement) that
fit the project's annotated masks best, and the workers' way of serving it.

:func:`calibrate` sweeps every label's threshold (:data:`groundlabel.calibration.THRESHOLDS`) over each
candidate variant (:data:`groundlabel.calibration.VARIANTS`: GEM's score maps with or without PAMR, the
label's masks sharpened by a promptable SAM or not, SAM 3's instances), chooses per label the variant and
threshold of best IoU on the tuning images, and reports it on the held-out images beside the deployment's
current settings, the default threshold and the best single global threshold. :func:`calibrated_regions`
answers a project's class prompts with a promoted calibration. Both find a label's mask with the same
function (:func:`label_mask`: the pixels where the label is the control's best and scores at least its
threshold, then SAM when the variant says so), so the figures measured are what the project is served.

IoU is pooled per label over a part's images (the intersections summed over the unions), and a part's
figure is the mean over the labels annotated in it. :func:`calibrate_expressions` makes one choice for a
project's typed referring expressions (LAVT or GEM grounding the expression, the threshold, SAM or not),
by overall IoU pooled over the expressions (RefCOCO's oIoU).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from groundlabel.calibration import THRESHOLDS, Calibration, ExpressionChoice, LabelChoice, variant_parts
from groundlabel.spec import ControlSpec, LabelingSpec
from workers.regions import control_model, control_threshold, prediction_score

log = logging.getLogger(__name__)

#: The controls whose labels a calibration chooses for: those whose annotations are masks.
MASK_CONTROLS = ("BrushLabels", "PolygonLabels")
#: The thresholds swept where SAM refines the masks (SAM runs once per distinct mask).
SAM_THRESHOLDS = THRESHOLDS[4::5]  # 0.1, 0.2, ... 0.9 and 0.98


@dataclass
class Sample:
    """One corrected image: the image and, per label name, its annotated mask (``[height, width]`` bool);
    ``split`` is ``"train"`` (tuning) or ``"val"`` (held out)."""

    image: Any
    masks: dict[str, np.ndarray]
    split: str
    key: str = ""


def with_refine(gem: Any, refine: str) -> Any:
    """The GEM engine ``gem`` with its own refinement set to ``refine`` (``"none"``, ``"pamr"``): a shallow
    copy sharing the model and the text cache (no second copy of the weights)."""
    if getattr(gem, "config", None) is None or getattr(gem.config, "refine", refine) == refine:
        return gem
    other = copy.copy(gem)
    other.config = replace(gem.config, refine=refine, pamr=False)
    return other


def current_variant(control: ControlSpec, default_engine: str, gem_refine: str | None) -> str:
    """The variant a control is served with today: its engine, and for GEM the deployment's
    ``GROUNDLABEL_GEM_REFINE``."""
    from groundlabel.settings import split_refine

    engine = control.engine(default_engine)
    if engine != "gem":
        return engine
    own, sam = split_refine(gem_refine)
    return "gem" + ("+pamr" if own == "pamr" else "") + ("+sam" if sam else "")


# -- one label's mask -------------------------------------------------------------------------------------


def label_mask(
    best: np.ndarray, index: np.ndarray, i: int, threshold: float, *, sam: Any = None, image: Any = None
) -> np.ndarray:
    """Label ``i``'s mask from a control's best label per pixel: where it wins and scores at least
    ``threshold``, sharpened by ``sam`` (:func:`workers.models.sam.refine_mask`) when given."""
    mask = (index == i) & (best >= threshold)
    if sam is not None and mask.any():
        from workers.models.sam.refine import refine_mask

        mask, _ = refine_mask(sam, image, mask, np.where(mask, best, 0.0))
    return mask


def instances_mask(instances: Sequence[Any], prompts: Sequence[str], threshold: float, shape) -> np.ndarray:
    """The union of the instances of ``prompts`` scoring at least ``threshold`` (SAM 3)."""
    mask = np.zeros(shape, dtype=bool)
    for inst in instances:
        if inst.prompt in prompts and inst.score >= threshold:
            mask |= np.asarray(inst.mask, dtype=bool)
    return mask


def _prompts(spec: LabelingSpec) -> tuple[list[str], list[str]]:
    from workers.pipeline import prompt_groups

    return prompt_groups(spec)


# -- the sweep --------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """Pooled pixel counts of one label under one variant, per threshold and part."""

    thresholds: tuple[float, ...]
    inter: dict[str, np.ndarray] = field(default_factory=dict)
    union: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, split: str, inter: np.ndarray, union: np.ndarray) -> None:
        n = len(self.thresholds)
        self.inter[split] = self.inter.get(split, np.zeros(n)) + inter
        self.union[split] = self.union.get(split, np.zeros(n)) + union

    def iou(self, split: str, threshold: float) -> float | None:
        """The pooled IoU at ``threshold`` (one of :attr:`thresholds`), None when nothing is in the part."""
        k = self.thresholds.index(threshold)
        union = float(self.union.get(split, np.zeros(len(self.thresholds)))[k])
        return float(self.inter[split][k]) / union if union > 0 else None


def _map_counts(best: np.ndarray, index: np.ndarray, i: int, gt: np.ndarray, thresholds) -> tuple:
    """Intersection and union of label ``i``'s mask with ``gt`` at each threshold, in one sort."""
    won = index == i
    values = np.sort(best[won])
    hits = np.sort(best[won & gt])
    t = np.asarray(thresholds, dtype=np.float32)
    predicted = len(values) - np.searchsorted(values, t, side="left")
    inter = len(hits) - np.searchsorted(hits, t, side="left")
    return inter.astype(float), (predicted + int(gt.sum()) - inter).astype(float)


def _mask_counts(masks: Sequence[np.ndarray], gt: np.ndarray) -> tuple:
    inter = np.array([float((m & gt).sum()) for m in masks])
    union = np.array([float((m | gt).sum()) for m in masks])
    return inter, union


@dataclass
class Setting:
    """One way of answering every calibrated label, with its IoU per label on each part."""

    name: str
    choices: dict[tuple[str, str], tuple[str, float]]  # (control, label) -> (variant, threshold)
    per_label: dict[str, dict[str, float | None]] = field(default_factory=dict)  # split -> label -> IoU

    def mean(self, split: str) -> float | None:
        values = [v for v in self.per_label.get(split, {}).values() if v is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict[str, Any]:
        """JSON: mean IoU per part (fractions), ``mIoU`` (held out, percent) and the per-label IoU."""
        held, tune = self.mean("val"), self.mean("train")
        return {
            "IoU": held,
            "mIoU": None if held is None else 100.0 * held,
            "tuning_IoU": tune,
            "per_label": self.per_label.get("val", {}),
            "tuning_per_label": self.per_label.get("train", {}),
            "choices": [
                {"control": c, "label": lab, "variant": v, "threshold": t}
                for (c, lab), (v, t) in self.choices.items()
            ],
        }


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found: the calibration and the settings it was compared with."""

    calibration: Calibration
    calibrated: Setting
    current: Setting
    default: Setting
    global_threshold: Setting
    tuning_images: int
    heldout_images: int
    variants: list[str]
    counts: dict[tuple[str, str, str], Counts] = field(default_factory=dict)  # (control, label, variant)

    def metrics(self) -> dict[str, Any]:
        """The figures a calibration version stores: ``base`` the current settings', ``new`` its own."""
        return {
            "base": self.current.summary(),
            "new": self.calibrated.summary(),
            "default_threshold": self.default.summary(),
            "global_threshold": self.global_threshold.summary(),
            "tuning_images": self.tuning_images,
            "heldout_images": self.heldout_images,
            "variants": self.variants,
        }


def calibrate(
    spec: LabelingSpec,
    samples: Sequence[Sample],
    get_variant: Callable[[str], Any],
    variants: Sequence[str],
    *,
    current: Callable[[ControlSpec, str], tuple[str, float]],
    default_threshold: float,
    sam: Any = None,
) -> CalibrationResult:
    """Choose per label of the mask controls the variant and threshold of best tuning IoU (see the module
    docstring). ``get_variant(name)``: the engine answering a variant (GEM with its refinement, SAM 3);
    ``sam``: the promptable SAM of the ``+sam`` variants; ``current(control, label)``: the variant and
    threshold the label is served with now (compared on the held-out part, and kept in a tie);
    ``default_threshold``: ``GROUNDLABEL_DEFAULT_THRESHOLD``, for the default-threshold figures."""
    controls = [c for c in spec.controls if c.type in MASK_CONTROLS]
    if not controls:
        from groundlabel.errors import UserError

        raise UserError(
            "calibration needs a BrushLabels or PolygonLabels control: its labels are compared with masks"
        )
    mask_spec = spec.without({c.name for c in spec.controls if c.type not in MASK_CONTROLS})
    prompts, groups = _prompts(mask_spec)
    now = {(c.name, lab): current(c, lab) for c in controls for lab in c.labels}
    extra = {t for _, t in now.values()} | {default_threshold}
    grids = {
        v: tuple(sorted(set(SAM_THRESHOLDS if variant_parts(v)[2] else THRESHOLDS) | extra)) for v in variants
    }
    counts: dict[tuple[str, str, str], Counts] = {
        (c.name, lab, v): Counts(grids[v]) for c in controls for lab in c.labels for v in variants
    }
    for n, sample in enumerate(samples):
        image = sample.image
        shape = (image.height, image.width)
        maps: dict[str, Any] = {}
        for v in variants:
            engine, own, with_sam = variant_parts(v)
            if engine == "sam3":
                (found,) = get_variant(v).instances([image], prompts, groups=groups, min_score=min(grids[v]))
                for control in controls:
                    for label in control.labels:
                        gt = sample.masks.get(label, np.zeros(shape, bool))
                        masks = [instances_mask(found, control.prompts[label], t, shape) for t in grids[v]]
                        counts[(control.name, label, v)].add(sample.split, *_mask_counts(masks, gt))
                continue
            base = "gem" + ("+pamr" if own == "pamr" else "")
            if base not in maps:
                from workers.pipeline import PromptMaps
                from workers.regions import working_size

                work = working_size(image.width, image.height)  # as served; compared at the image's size
                (raw,) = get_variant(base).heatmaps([image], prompts, groups=groups, sizes=[work], lazy=True)
                maps[base] = PromptMaps(prompts, raw)
            for control in controls:
                model = control_model(control)
                best, index = model.best_label(maps[base], width=image.width, height=image.height)
                for i, label in enumerate(control.labels):
                    gt = sample.masks.get(label, np.zeros(shape, bool))
                    key = (control.name, label, v)
                    if not with_sam:
                        counts[key].add(sample.split, *_map_counts(best, index, i, gt, grids[v]))
                        continue
                    masks, last, last_mask = [], None, None
                    for t in grids[v]:
                        raw_mask = (index == i) & (best >= t)
                        if last is None or not np.array_equal(raw_mask, last):
                            last, last_mask = raw_mask, label_mask(best, index, i, t, sam=sam, image=image)
                        masks.append(last_mask)
                    counts[key].add(sample.split, *_mask_counts(masks, gt))
        log.info("calibration: image %d/%d (%s) scored", n + 1, len(samples), sample.split)

    def evaluate(name: str, choices: dict[tuple[str, str], tuple[str, float]]) -> Setting:
        setting = Setting(name, choices)
        for split in ("train", "val"):
            setting.per_label[split] = {
                f"{c}/{lab}": counts[(c, lab, v)].iou(split, t) for (c, lab), (v, t) in choices.items()
            }
        return setting

    chosen: dict[tuple[str, str], tuple[str, float]] = {}
    for key, (v_now, t_now) in now.items():
        best_choice, best_iou = (
            (v_now, t_now),
            counts[(*key, v_now)].iou("train", t_now) if v_now in variants else None,
        )
        for v in variants:
            for t in grids[v]:
                iou = counts[(*key, v)].iou("train", t)
                if iou is not None and (best_iou is None or iou > best_iou + 1e-9):
                    best_choice, best_iou = (v, t), iou
        chosen[key] = best_choice
    current_setting = evaluate("current", now)
    default = evaluate("default threshold", {k: (v, default_threshold) for k, (v, _) in now.items()})
    # the best single threshold for every label, each served as now
    shared = sorted(set.intersection(*(set(grids[v]) for v, _ in now.values())))
    best_t = max(
        shared, key=lambda t: evaluate("", {k: (v, t) for k, (v, _) in now.items()}).mean("train") or 0.0
    )
    global_setting = evaluate(f"global threshold {best_t:g}", {k: (v, best_t) for k, (v, _) in now.items()})
    calibrated = evaluate("calibrated", chosen)
    calibration = Calibration([LabelChoice(c, lab, v, t) for (c, lab), (v, t) in chosen.items()])
    tune = sum(1 for s in samples if s.split == "train")
    return CalibrationResult(
        calibration,
        calibrated,
        current_setting,
        default,
        global_setting,
        tune,
        len(samples) - tune,
        list(variants),
        counts,
    )


# -- serving ----------------------------------------------------------------------------------------------


def calibrated_regions(
    spec: LabelingSpec,
    images: Sequence[Any],
    calibration: Calibration,
    get_variant: Callable[[str], Any],
    *,
    current: Callable[[ControlSpec], str],
    version: str,
    sam: Any = None,
) -> list[Any]:
    """Regions of the controls the calibration chose for, one :class:`workers.pipeline.ImageRegions` per
    image named ``version`` (or its exception): each label through its chosen variant and threshold
    (:func:`label_mask`), the labels it made no choice for as the control is served now
    (``current(control)``, at the control's threshold)."""
    from workers.pipeline import ImageRegions, PromptMaps, instance_results, prompt_groups
    from workers.regions import working_size

    prompts, groups = prompt_groups(spec)
    sam3_floor = min((c.threshold for c in calibration.choices if c.variant == "sam3"), default=0.0)
    out: list[Any] = []
    for image in images:
        try:
            results: list[dict[str, Any]] = []
            maps: dict[str, Any] = {}
            found: list[Any] | None = None
            for control in spec.controls:
                model = control_model(control)
                if model.skip or not control.labels:
                    continue
                picks = []
                for label in control.labels:
                    c = calibration.choice(control.name, label)
                    picks.append(
                        (c.variant, c.threshold) if c else (current(control), control_threshold(control))
                    )
                per_variant: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                for i, (label, (variant, threshold)) in enumerate(zip(control.labels, picks, strict=True)):
                    engine, own, with_sam = variant_parts(variant)
                    size = {"width": image.width, "height": image.height}
                    if engine == "sam3":
                        if found is None:
                            floor = min(sam3_floor, threshold)
                            (found,) = get_variant("sam3").instances(
                                [image], prompts, groups=groups, min_score=floor
                            )
                        for inst in found:
                            if inst.prompt in control.prompts[label] and inst.score >= threshold:
                                results.extend(instance_results(control, label, inst, **size))
                        continue
                    base = "gem" + ("+pamr" if own == "pamr" else "")
                    if base not in maps:  # at the regions' working size, read one prompt at a time
                        work = working_size(image.width, image.height)
                        (raw,) = get_variant(base).heatmaps(
                            [image], prompts, groups=groups, sizes=[work], lazy=True
                        )
                        maps[base] = PromptMaps(prompts, raw)
                    key = base + ("+sam" if with_sam else "")  # SAM is given the image's size
                    if key not in per_variant:
                        w, h = (
                            (image.width, image.height)
                            if with_sam
                            else working_size(image.width, image.height)
                        )
                        per_variant[key] = model.best_label(maps[base], width=w, height=h)
                    best, index = per_variant[key]
                    mask = label_mask(best, index, i, threshold, sam=sam if with_sam else None, image=image)
                    if mask.any():
                        results.extend(model.regions(label, mask, best, **size))
            out.append(ImageRegions(results, prediction_score(results), version))
        except Exception as exc:
            out.append(exc)
    return out


# -- referring expressions --------------------------------------------------------------------------------


@dataclass
class ExpressionSample:
    """One corrected referring expression: the image, the typed expression, the annotated mask of what it
    names (``[height, width]`` bool) and the image's ``split`` (``"train"`` or ``"val"``)."""

    image: Any
    expression: str
    mask: np.ndarray
    split: str


@dataclass
class ExpressionResult:
    """The expression choice and its overall IoU (cumulative intersection over cumulative union, RefCOCO's
    oIoU) per part, beside what is served now; ``counts`` per variant (``lavt``, ``gem+sam``...)."""

    choice: ExpressionChoice
    current: ExpressionChoice
    counts: dict[str, Counts]

    def oiou(self, choice: ExpressionChoice, split: str) -> float | None:
        """The pooled IoU of ``choice`` on ``split``."""
        return self.counts[choice.variant].iou(split, choice.threshold)

    def metrics(self) -> dict[str, Any]:
        """JSON: the choice and the current setting with their tuning and held-out oIoU."""

        def figures(c: ExpressionChoice) -> dict[str, Any]:
            return {**asdict(c), "oIoU": self.oiou(c, "val"), "tuning_oIoU": self.oiou(c, "train")}

        return {"new": figures(self.choice), "base": figures(self.current), "variants": list(self.counts)}


def calibrate_expressions(
    samples: Sequence[ExpressionSample],
    answer: Callable[[str, Any, str], np.ndarray],
    engines: Sequence[str],
    *,
    current: ExpressionChoice,
    sam: Any = None,
) -> ExpressionResult:
    """Choose for a project's expressions the engine (of ``engines``: ``"lavt"``, ``"gem"``), threshold and,
    with ``sam``, SAM's sharpening of best tuning oIoU. ``answer(engine, image, expression)``: the engine's
    probability map at the image's size; ``current``: what is served now (compared, and kept in a tie)."""
    variants = [(e, False) for e in engines] + ([(e, True) for e in engines] if sam is not None else [])
    extra = {current.threshold}
    counts = {
        e + ("+sam" if s else ""): Counts(tuple(sorted(set(SAM_THRESHOLDS if s else THRESHOLDS) | extra)))
        for e, s in variants
    }
    for sample in samples:
        for engine in engines:
            prob = np.asarray(answer(engine, sample.image, sample.expression), dtype=np.float32)
            zeros = np.zeros(prob.shape, dtype=np.int64)
            counts[engine].add(
                sample.split, *_map_counts(prob, zeros, 0, sample.mask, counts[engine].thresholds)
            )
            if sam is not None:
                grid = counts[engine + "+sam"].thresholds
                masks = [label_mask(prob, zeros, 0, t, sam=sam, image=sample.image) for t in grid]
                counts[engine + "+sam"].add(sample.split, *_mask_counts(masks, sample.mask))
    result = ExpressionResult(current, current, counts)
    best = result.oiou(current, "train") if current.variant in counts else None
    for e, s in variants:
        for t in counts[e + ("+sam" if s else "")].thresholds:
            candidate = ExpressionChoice(e, t, s)
            iou = result.oiou(candidate, "train")
            if iou is not None and (best is None or iou > best + 1e-9):
                result.choice, best = candidate, iou
    return result
