"""``groundlabel eval-gem``: zero-shot semantic segmentation mIoU of GEM on the public benchmarks.

Also registers ``groundlabel train-tiny-clip`` (the tiny CLIP of the offline quality test) and
``groundlabel export-tiny-models`` (the tiny CLIP and SAM as files that serve and worker load).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.settings import Settings, split_refine
from workers.evaluation import tiny_clip, tiny_models
from workers.evaluation.datasets import ALIASES, DATASETS, get_dataset
from workers.evaluation.inference import MODES
from workers.models.gem.config import METHODS
from workers.models.sam.cli import REFINE_CHOICES, add_sam_arguments, sam_engine_from_args


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate and return the JSON-ready result (also used by the tests)."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from workers.evaluation.inference import class_scores, predict_labels
    from workers.evaluation.metrics import ConfusionMatrix
    from workers.models.gem import GemConfig, GemEngine

    engines = Settings.from_env().engines
    spec = get_dataset(args.dataset)
    samples = spec.samples(args.root)
    if args.limit:
        samples = samples[: args.limit]
    bg_threshold = args.bg_threshold if spec.background else None
    size = args.crop if args.mode == "slide" else args.image_size
    config = GemConfig(
        model_name=args.model,
        pretrained=args.pretrained or None,
        cache_dir=args.weights_dir or engines.weights_dir,
        hub=engines.hub,
        image_size=size,
        gem_depth=args.gem_depth,
        method=args.method,
        refine=split_refine(args.refine)[0],
        templates=args.templates,
        device=args.device,
    )
    engine = getattr(args, "engine", None) or GemEngine(config)
    sam = getattr(args, "sam_engine", None) or sam_engine_from_args(args, engines)
    matrix = ConfusionMatrix(spec.num_classes)
    start = time.perf_counter()
    for sample in tqdm(samples, desc=f"eval-gem {spec.name}", unit="img", disable=args.no_progress):
        with Image.open(sample.image) as im:
            image = im.convert("RGB")
        gt = spec.load_label(sample.label)
        scores = class_scores(
            engine.heatmaps,
            image,
            spec.classes,
            mode=args.mode,
            short_side=args.short_side,
            crop=args.crop,
            stride=args.stride,
            out_size=gt.shape,
        )
        pred = predict_labels(scores, background=spec.background, bg_threshold=bg_threshold)
        if sam is not None:
            from workers.models.sam.refine import refine_label_map

            at_gt = image if image.size == gt.shape[::-1] else image.resize(gt.shape[::-1], Image.BILINEAR)
            pred = refine_label_map(sam, at_gt, pred, scores, background=0 if spec.background else None)
        matrix.update(np.asarray(pred), gt)
    seconds = time.perf_counter() - start
    version = getattr(engine, "model_version", None)
    if sam is not None and version is not None:
        from workers.models.sam.config import refined_version

        version = refined_version(version, sam.model_version)
    return {
        "dataset": spec.name,
        "title": spec.title,
        "images": len(samples),
        "mode": args.mode,
        "short_side": args.short_side if args.mode == "slide" else None,
        "crop": args.crop if args.mode == "slide" else None,
        "stride": args.stride if args.mode == "slide" else None,
        "bg_threshold": bg_threshold,
        "model_version": version,
        "config": config.to_dict(),
        "seconds": seconds,
        "metrics": matrix.summary(spec.class_names),
    }


def _eval_command(args: argparse.Namespace) -> int:
    from workers.evaluation.metrics import format_table

    if args.mode == "slide" and not 1 <= args.stride <= args.crop:
        raise UserError(f"--stride must lie in [1, --crop], got stride {args.stride}, crop {args.crop}")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be a positive number of images")
    result = run_eval(args)
    protocol = (
        f"slide, short side {args.short_side}, crop {args.crop}, stride {args.stride}"
        if args.mode == "slide"
        else f"whole image resized to {args.image_size}x{args.image_size}"
    )
    title = (
        f"{result['title']}: {result['images']} images, {result['model_version']}, "
        f"{args.method}{'' if args.refine == 'none' else ', ' + args.refine}, {protocol}, "
        f"templates {args.templates}"
        + (f", background threshold {result['bg_threshold']}" if result["bg_threshold"] is not None else "")
    )
    print(format_table(result["metrics"], title))
    print(f"{result['seconds']:.1f} s ({result['seconds'] / max(result['images'], 1):.2f} s/image)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval-gem`` and ``train-tiny-clip``."""
    p = subparsers.add_parser(
        "eval-gem",
        help="zero-shot semantic segmentation mIoU of GEM on VOC, Context, ADE20K, COCO-Stuff, Cityscapes",
        description="Evaluate GEM (or MaskCLIP / CLIP's own patch tokens) with the standard training-free "
        "zero-shot protocol.",
    )
    names = [*DATASETS, *ALIASES]
    p.add_argument(
        "--dataset",
        required=True,
        choices=names,
        metavar="NAME",
        help="voc (= voc21), voc20, context (= context60), context59, ade, coco-stuff, cityscapes",
    )
    p.add_argument("--root", required=True, help="dataset folder (or a parent of it); see docs/quality.md")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="resize",
        help="resize: whole image at --image-size (GEM's protocol, default); "
        "slide: short side --short-side, windows --crop every --stride (ClearCLIP/TCL)",
    )
    p.add_argument("--image-size", type=int, default=448, help="network input size in resize mode")
    p.add_argument("--short-side", type=int, default=448, help="short side before sliding windows")
    p.add_argument("--crop", type=int, default=448, help="sliding-window size")
    p.add_argument("--stride", type=int, default=224, help="sliding-window stride")
    p.add_argument(
        "--bg-threshold",
        type=float,
        default=0.5,
        help="VOC21 / Context60: background where the best calibrated class score is below this",
    )
    p.add_argument(
        "--templates",
        choices=("paper", "ensemble"),
        default="paper",
        help="paper: 'a photo of a {}.'; ensemble: the 80 ImageNet templates",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="gem",
        help="dense features (docs/methods.md); EVA02 backbones (CLIPSelf) take clipself or maskclip",
    )
    p.add_argument(
        "--refine",
        choices=REFINE_CHOICES,
        default="none",
        help="pamr: refine the score maps (TCL); sam: sharpen each class's parts with a promptable SAM "
        "(--sam-model, docs/sam.md)",
    )
    p.add_argument("--gem-depth", type=int, default=7)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (ViT-B/16 accepted)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or a local weights file")
    p.add_argument(
        "--weights-dir", default=None, help="folder searched for weights (default $GROUNDLABEL_WEIGHTS_DIR)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sam_arguments(p)
    p.set_defaults(handler=_eval_command)
    tiny_clip.register(subparsers)
    tiny_models.register(subparsers)
