"""Command-line options for the promptable SAM, shared by ``predict`` and ``eval-gem``, and the
``train-tiny-sam`` verb."""

from __future__ import annotations

import argparse
from typing import Any

from groundlabel.errors import UserError
from groundlabel.settings import EngineSettings, split_refine

REFINE_CHOICES = ("none", "pamr", "sam", "pamr+sam")


def add_sam_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sam-model``, ``--sam-family``, ``--sam-min-iou`` (defaults: the ``GROUNDLABEL_SAM_*`` settings)."""
    group = parser.add_argument_group("promptable SAM (--refine sam)")
    group.add_argument(
        "--sam-model",
        default=None,
        help="hub id (facebook/sam2.1-hiera-tiny), local folder or groundlabel checkpoint; "
        "default $GROUNDLABEL_SAM_MODEL; 'random' for random weights",
    )
    group.add_argument(
        "--sam-family", default=None, help="sam3_tracker, sam2, sam, sam_hq or edgetam (default: the model's)"
    )
    group.add_argument(
        "--sam-min-iou", type=float, default=None, help="keep SAM's mask of a part when IoU >= this (0)"
    )
    group.add_argument(
        "--sam-min-score", type=float, default=None,
        help="remove a part where SAM's predicted IoU is below this (0.4)",
    )  # fmt: skip


def sam_engine_from_args(args: argparse.Namespace, engines: EngineSettings) -> Any:
    """The SAM engine ``--refine`` asks for (None without ``sam`` in it), from the options and settings."""
    if not split_refine(getattr(args, "refine", "none"))[1]:
        return None
    from .config import SamConfig
    from .engine import SamEngine

    model = args.sam_model or engines.sam_model
    if model is None and not (args.sam_model or engines.sam_enabled):
        raise UserError("--refine sam needs a promptable SAM: --sam-model (or GROUNDLABEL_SAM_MODEL)")
    if model is not None and model.strip().lower() in ("random", "none"):
        model = None
    options = engines.sam_options()
    options.update(model=model, family=args.sam_family or engines.sam_family)
    if options["model"] is None and options["family"] is None:
        options["family"] = "sam2"
    for key in ("min_iou", "min_score"):
        if getattr(args, f"sam_{key}", None) is not None:
            options[key] = getattr(args, f"sam_{key}")
    if getattr(args, "device", None):
        options["device"] = args.device
    return SamEngine(SamConfig(**options))
