"""``groundlabel calibrate --project N``: per label, the threshold and the engine and refinement that the
project's corrections prefer, stored in the model store and promoted only when the held-out IoU rises.

The project's annotations are read through Label Studio's API and exported as COCO (``groundlabel export
--format coco``'s code); its images are split by image as training splits them (the same seeded hash,
``GROUNDLABEL_TRAIN_HOLDOUT``, ``GROUNDLABEL_TRAIN_SEED``). :func:`workers.calibration.calibrate` chooses
per brush or polygon label the variant (GEM, GEM + PAMR, GEM + SAM, SAM 3: those this deployment has) and
the threshold of best IoU on the tuning images; the choice is checked on the held-out images against what
the project is served now. It is stored as a ``calibration`` version (a small JSON file with its held-out
figures) and promoted when its held-out IoU beats the current one's by more than
``GROUNDLABEL_TRAIN_MIN_GAIN``; workers apply it to that project from their next job on. Where the
corrected tasks carry typed referring expressions, one choice for them all (LAVT or GEM grounding the
expression, threshold, SAM or not; :func:`calibrate_expressions_of`) joins the record, its held-out oIoU
counted as one more label's IoU. It is also the
first, cheap step of a training job (:func:`groundlabel_cli.training.train_project`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.model_store import ModelStore
from groundlabel.settings import Settings

log = logging.getLogger("groundlabel.calibrate")


@dataclass
class CalibrationOutcome:
    """What a calibration did: its version, the settings it was compared with, and the decision."""

    version: str
    parent: str
    promoted: bool
    reason: str
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (the held-out figures as ``base`` and ``new`` mean IoU)."""
        m = self.metrics
        return {
            "version": self.version,
            "kind": "calibration",
            "parent": self.parent,
            "promoted": self.promoted,
            "reason": self.reason,
            "base": {"IoU": m["base"]["IoU"]},
            "new": {"IoU": m["new"]["IoU"]},
            "default_threshold_IoU": m["default_threshold"]["IoU"],
            "global_threshold_IoU": m["global_threshold"]["IoU"],
            "choices": m["new"]["choices"],
            "expressions": m.get("expressions"),
        }


def read_samples(data_root: Path, splits: dict[int, str]) -> list[Any]:
    """The corrected images of an exported COCO folder with their masks per label name (annotations of one
    label merged), each with its split; images of no split are left out."""
    from PIL import Image

    from exporters.geometry import decode_segmentation
    from workers.calibration import Sample

    coco = json.loads((data_root / "instances.json").read_text(encoding="utf-8"))
    names = {int(c["id"]): c["name"] for c in coco["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    samples = []
    for img in sorted(coco["images"], key=lambda i: i["id"]):
        split = splits.get(int(img["id"]))
        if split not in ("train", "val") or not by_image.get(int(img["id"])):
            continue
        file = data_root / "images" / img["file_name"]
        if not file.is_file():
            file = data_root / img["file_name"]
        with Image.open(file) as im:
            image = im.convert("RGB")
        width, height = image.size
        masks: dict[str, Any] = {}
        for ann in by_image[int(img["id"])]:
            mask = decode_segmentation(ann["segmentation"], width, height).astype(bool)
            name = names[int(ann["category_id"])]
            masks[name] = masks[name] | mask if name in masks else mask
        samples.append(Sample(image, masks, split, str(img["file_name"])))
    return samples


def read_expressions(out: Path, splits: dict[int, str]) -> list[Any]:
    """The corrected referring expressions of an exported gRefCOCO folder, one sample per sentence with the
    union of its targets' masks (empty for a no-target expression) and its image's split; images of no
    split are left out."""
    from PIL import Image

    from exporters.geometry import decode_segmentation
    from workers.calibration import ExpressionSample

    data = out / "grefcoco"
    coco = json.loads((data / "instances.json").read_text(encoding="utf-8"))
    anns = {int(a["id"]): a for a in coco["annotations"]}
    samples = []
    for ref in json.loads((data / "grefs(unc).json").read_text(encoding="utf-8")):
        split = splits.get(int(ref["image_id"]))
        if split not in ("train", "val"):
            continue
        with Image.open(out / "images" / "train2014" / ref["file_name"]) as im:
            image = im.convert("RGB")
        mask = np.zeros((image.height, image.width), dtype=bool)
        for ann_id in ref["ann_id"]:
            if int(ann_id) in anns:
                seg = anns[int(ann_id)]["segmentation"]
                mask |= decode_segmentation(seg, image.width, image.height).astype(bool)
        samples += [ExpressionSample(image, s["sent"], mask, split) for s in ref["sentences"]]
    return samples


def calibrate_expressions_of(
    project: str, spec: Any, settings: Settings, samples: list[Any], served: Any
) -> Any:
    """The expression choice (:func:`workers.calibration.calibrate_expressions`) between LAVT, when the
    deployment or the project has one, and GEM grounding the expression, with SAM's sharpening as a
    candidate when a promptable SAM is configured; compared with what ``served`` (the promoted
    calibration, or None) or the uncalibrated worker answers expressions with."""
    from groundlabel.calibration import ExpressionChoice
    from workers import engines
    from workers.calibration import calibrate_expressions
    from workers.pipeline import LAVT_MASK_THRESHOLD
    from workers.regions import DEFAULT_THRESHOLD, control_threshold

    has_lavt = engines.lavt_enabled(project)
    current = served.expressions if served is not None else None
    if current is None or (current.engine == "lavt" and not has_lavt):
        kind = "lavt" if has_lavt else "gem"
        threshold = (  # as the worker thresholds an uncalibrated expression
            LAVT_MASK_THRESHOLD
            if has_lavt
            else min((control_threshold(c) for c in spec.controls), default=DEFAULT_THRESHOLD)
        )
        current = ExpressionChoice(kind, threshold, engines.sam_refines(settings.engines, kind))

    def answer(engine: str, image: Any, expression: str) -> np.ndarray:
        if engine == "lavt":
            ((prob, _),) = engines.get_lavt_engine(project).probabilities([image], [expression])
            return np.asarray(prob, dtype=np.float32)
        (maps,) = engines.get_gem_engine(project).heatmaps([image], [expression])
        return np.asarray(maps[0], dtype=np.float32)

    sam = engines.get_sam_engine() if settings.engines.sam_enabled else None
    return calibrate_expressions(
        samples, answer, ["lavt", "gem"] if has_lavt else ["gem"], current=current, sam=sam
    )


def candidate_variants(spec: Any, settings: Settings, asked: list[str] | None) -> list[str]:
    """The variants this deployment has: GEM with and without PAMR, with SAM's sharpening when a promptable
    SAM is configured, SAM 3 when the deployment's engine or a control names it (``asked``: only those)."""
    from groundlabel.calibration import VARIANTS

    engines = settings.engines
    if asked:
        unknown = [v for v in asked if v not in VARIANTS]
        if unknown:
            raise UserError(f"unknown variants {', '.join(unknown)}: choose among {', '.join(VARIANTS)}")
        return [v for v in VARIANTS if v in asked]
    out = ["gem", "gem+pamr"]
    if engines.sam_enabled:
        out += ["gem+sam", "gem+pamr+sam"]
    if engines.engine == "sam3" or any(c.engine(engines.engine) == "sam3" for c in spec.controls):
        out.append("sam3")
    return out


def calibrate_project(
    project: str,
    settings: Settings,
    store: ModelStore,
    *,
    label_studio_url: str | None = None,
    variants: list[str] | None = None,
    annotations: tuple[list[dict[str, Any]], str] | None = None,
    work_dir: Path | None = None,
) -> CalibrationOutcome:
    """Calibrate ``project`` (see the module docstring); returns what was stored and decided.

    ``annotations``: the project's tasks and label config when already read (a training job), else they
    are read from Label Studio (``LABEL_STUDIO_URL``, or ``label_studio_url`` on a host allowed by name)."""
    from exporters.coco import export_coco
    from exporters.images import ImageResolver
    from exporters.labelstudio import fetch_project
    from groundlabel.spec import read_spec
    from groundlabel_cli.splits import annotation_count, split_coco_images
    from workers import engines
    from workers.calibration import calibrate, current_variant

    fetch = settings.fetch
    url = fetch.token_url(label_studio_url) if fetch.api_key else None
    if annotations is not None:
        tasks, label_config = annotations
    elif not url or not fetch.api_key:
        raise UserError(
            "calibration reads the project from Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    else:
        tasks, label_config, _ = fetch_project(int(project), url=url, api_key=fetch.api_key)
    count = annotation_count(tasks)
    if not count:
        raise UserError(f"project {project} has no annotations to calibrate on")
    spec = read_spec(label_config, settings)
    scratch = Path(tempfile.mkdtemp(prefix=f"groundlabel-calibrate-{project}-", dir=work_dir))
    try:

        def resolver_of() -> ImageResolver:  # an export closes its resolver
            return ImageResolver(
                images_root=fetch.local_files_root,
                label_studio_url=url,
                api_key=fetch.api_key,
                allowed_hosts=fetch.allowed_hosts,
            )

        export_coco(tasks, scratch, label_config=label_config, resolver=resolver_of())
        splits = split_coco_images(scratch, settings.training.holdout, settings.training.seed)
        samples = read_samples(scratch, splits)
        expression_samples: list[Any] = []
        if spec.text_key or any(c.type == "TextArea" for c in spec.controls):
            from exporters.refcoco import export_grefcoco

            refs = scratch / "expressions"
            export_grefcoco(tasks, refs, label_config=label_config, resolver=resolver_of())
            ref_splits = split_coco_images(
                refs / "grefcoco", settings.training.holdout, settings.training.seed
            )
            expression_samples = read_expressions(refs, ref_splits)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tune = sum(1 for s in samples if s.split == "train")
    if not tune or tune == len(samples):
        raise UserError(
            f"project {project} has {tune} tuning and {len(samples) - tune} held-out annotated images after "
            "the split by image; both parts need at least one (annotate more images)"
        )

    promoted = store.promoted(project)
    served = store.calibration(promoted) if promoted is not None and promoted.kind == "calibration" else None
    trained = store.served_trained(project)  # the calibration serves over it
    default = settings.engines.engine
    refine = settings.engines.gem_refine
    from workers.regions import DEFAULT_THRESHOLD, control_threshold

    fallback = settings.backend.default_threshold

    def current(control: Any, label: str) -> tuple[str, float]:
        choice = served.choice(control.name, label) if served is not None else None
        if choice is not None:
            return choice.variant, choice.threshold
        return current_variant(control, default, refine), control_threshold(control)

    candidates = candidate_variants(spec, settings, variants)
    now = {current(c, lab)[0] for c in spec.controls for lab in c.labels}
    candidates += [v for v in now if v not in candidates]
    parent = promoted.name if promoted is not None else engines.model_versions(settings.engines)[default]
    log.info(
        "project %s: calibrating %s on %d tuning and %d held-out images (%s)",
        project,
        parent,
        tune,
        len(samples) - tune,
        ", ".join(candidates),
    )
    result = calibrate(
        spec,
        samples,
        lambda v: engines.variant_engine(v, project),
        candidates,
        current=current,
        default_threshold=DEFAULT_THRESHOLD if fallback is None else fallback,
        sam=engines.get_sam_engine() if any(v.endswith("+sam") for v in candidates) else None,
    )
    result.calibration.trained = trained.name if trained is not None else None
    metrics = result.metrics()
    new, base = result.calibrated.mean("val") or 0.0, result.current.mean("val") or 0.0
    held = [s for s in expression_samples if s.split == "val"]
    if held and len(held) < len(expression_samples):  # expressions count as one more label
        chosen = calibrate_expressions_of(project, spec, settings, expression_samples, served)
        result.calibration.expressions = chosen.choice
        metrics["expressions"] = chosen.metrics()
        new = with_expressions(result.calibrated, chosen.oiou(chosen.choice, "val"))
        base = with_expressions(result.current, chosen.oiou(chosen.current, "val"))
        log.info(
            "project %s: expressions: %s at %g (held-out oIoU %.4f, served now %s at %g: %.4f)",
            project, chosen.choice.variant, chosen.choice.threshold, chosen.oiou(chosen.choice, "val") or 0.0,
            chosen.current.variant, chosen.current.threshold, chosen.oiou(chosen.current, "val") or 0.0,
        )  # fmt: skip
    better = new > base + settings.training.min_gain
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "calibration.json"
        file.write_text(json.dumps(result.calibration.to_dict(), indent=2), encoding="utf-8")
        version = store.add(
            project=project,
            kind="calibration",
            variant=default,
            weights=file,
            parent=parent,
            annotation_count=count,
            config=result.calibration.to_dict(),
            metrics=metrics,
        )
    comparison = f"held-out IoU {new:.4f} vs {base:.4f} for {parent}"
    if better:
        reason = f"promoted: {comparison}"
        store.promote(project, version.name, reason)
    else:
        gain = settings.training.min_gain
        reason = f"not promoted ({comparison}, needs a gain above {gain:g}): {parent} serves on"
    log.info("project %s: stored %s, %s", project, version.name, reason)
    return CalibrationOutcome(version.name, parent, better, reason, metrics)


def with_expressions(setting: Any, oiou: float | None) -> float:
    """The held-out figure of a setting with the expressions' oIoU counted as one more label's IoU."""
    values = [v for v in setting.per_label.get("val", {}).values() if v is not None]
    values += [oiou] if oiou is not None else []
    return float(np.mean(values)) if values else 0.0


def calibrated_iou(spec: Any, samples: list[Any], calibration: Any, gem: Any) -> float:
    """The held-out IoU of the GEM engine ``gem`` answering with ``calibration``'s choices (labels without
    one at their control's threshold, as served): how a fine-tuned GEM is compared with the current one when
    the project is served calibrated."""
    from groundlabel.calibration import variant_parts
    from workers import engines
    from workers.calibration import calibrate, current_variant, with_refine
    from workers.regions import control_threshold

    settings = engines.settings().engines

    def current(control: Any, label: str) -> tuple[str, float]:
        choice = calibration.choice(control.name, label)
        if choice is not None:
            return choice.variant, choice.threshold
        return current_variant(control, settings.engine, settings.gem_refine), control_threshold(control)

    def get_variant(variant: str) -> Any:
        engine, own, _ = variant_parts(variant)
        return with_refine(gem, own) if engine == "gem" else engines.get_engine(engine)

    used = sorted({current(c, lab)[0] for c in spec.controls for lab in c.labels})
    sam = engines.get_sam_engine() if any(v.endswith("+sam") for v in used) else None
    result = calibrate(spec, samples, get_variant, used, current=current, default_threshold=0.5, sam=sam)
    return result.current.mean("val") or 0.0


def run(args: argparse.Namespace) -> int:
    """Handler of ``groundlabel calibrate``."""
    from groundlabel.model_store import check_project
    from workers import engines

    settings = Settings.from_env()
    url = args.store or settings.training.model_store
    if not url:
        raise UserError("calibration stores its result: give --store or set GROUNDLABEL_MODEL_STORE")
    store = ModelStore.from_url(url, settings.training.s3)
    if args.store:
        from dataclasses import replace

        settings = replace(settings, training=replace(settings.training, model_store=args.store))
    engines.configure(settings)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    outcome = calibrate_project(check_project(args.project), settings, store, variants=variants)
    out = outcome.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{outcome.version}: {outcome.reason}")
    print(
        f"held-out IoU: calibrated {out['new']['IoU']:.4f}, served now {out['base']['IoU']:.4f}, "
        f"default threshold {out['default_threshold_IoU']:.4f}, "
        f"best global threshold {out['global_threshold_IoU']:.4f}"
    )
    for c in out["choices"]:
        print(f"  {c['control']}/{c['label']}: {c['variant']} at {c['threshold']:g}")
    if out["expressions"]:
        e = out["expressions"]
        print(
            f"  expressions: {e['new']['engine']}{'+sam' if e['new']['sam'] else ''} at "
            f"{e['new']['threshold']:g} (held-out oIoU {e['new']['oIoU'] or 0:.4f}, "
            f"served now {e['base']['oIoU'] or 0:.4f})"
        )
    return 0


def register(subparsers: Any) -> None:
    """Add the ``calibrate`` verb."""
    p = subparsers.add_parser(
        "calibrate",
        help="choose per label the threshold, engine and refinement from a project's corrections",
        description="Read the project's annotations from Label Studio (LABEL_STUDIO_URL, "
        "LABEL_STUDIO_API_KEY), split its images as training does, choose per brush or polygon label "
        "the variant (gem, gem+pamr, gem+sam, gem+pamr+sam, sam3: those configured) and threshold of "
        "best IoU on the tuning images, "
        "check them on the held-out ones, store a 'calibration' version in the model store and promote it "
        "when the held-out IoU rises (workers apply it from their next job on).",
    )
    p.add_argument("--project", required=True, help="the Label Studio project id")
    p.add_argument("--store", help="the model store (default: GROUNDLABEL_MODEL_STORE)")
    p.add_argument("--variants", help="only these variants, comma-separated (default: every one configured)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=run)
