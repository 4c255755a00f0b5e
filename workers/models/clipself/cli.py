"""``groundlabel distill IMAGES_DIR --out CKPT``: CLIPSelf self-distillation on a project's own images.

The output is an open_clip state dict; GEM uses it with ``--pretrained CKPT`` (same ``--model``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from groundlabel.errors import UserError
from groundlabel.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` verb."""
    p = subparsers.add_parser(
        "distill",
        help="CLIPSelf self-distillation of a CLIP model's dense features on unlabelled images",
        description=(
            "CLIPSelf self-distillation: the dense features of the image at --image-size learn to match a "
            "frozen copy's embeddings of grid crops. Writes an open_clip state dict usable as --pretrained."
        ),
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", "-o", required=True, metavar="CKPT", help="output .pt or .safetensors file")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument(
        "--model-config", metavar="FILE.json", help="an open_clip model config (its stem is the name)"
    )
    p.add_argument(
        "--pretrained",
        default="openai",
        help="starting weights: open_clip tag, weight file, or 'none' (default openai)",
    )
    p.add_argument("--weights-dir", help="folder searched for weights (default $GROUNDLABEL_WEIGHTS_DIR)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--image-size", type=int, default=1024, help="student input size (default 1024)")
    p.add_argument("--crop-size", type=int, default=None, help="teacher crop size (default: the model's)")
    p.add_argument("--max-split", type=int, default=6, help="largest grid side (default 6)")
    p.add_argument("--max-boxes", type=int, default=20, help="grid cells per image (default 20)")
    p.add_argument(
        "--ensemble-alpha",
        type=float,
        default=0.7,
        help="saved weights = alpha·student + (1-alpha)·teacher (default 0.7)",
    )
    p.add_argument("--save-every", type=int, default=0, help="also write CKPT every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of images")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def run(args: argparse.Namespace) -> int:
    """Handler of ``groundlabel distill``."""
    from workers.images import decode_image
    from workers.models.clipself.distill import DistillConfig, distill
    from workers.models.device import resolve_device
    from workers.models.gem.weights import load_clip, register_model_config

    files = find_images(args.images_dir)
    model_name = args.model
    if args.model_config:
        model_name = register_model_config(args.model_config, "--model-config")
    config = DistillConfig(
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        image_size=args.image_size,
        crop_size=args.crop_size,
        max_split=args.max_split,
        max_boxes=args.max_boxes,
        ensemble_alpha=args.ensemble_alpha,
        seed=args.seed,
    )
    config.validate()
    out = Path(args.out)
    if out.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors"):
        raise UserError(f"--out {out}: use a .pt, .pth, .bin or .safetensors file name")
    device = resolve_device(args.device)
    engines = Settings.from_env().engines
    loaded = load_clip(model_name, args.pretrained, args.weights_dir or engines.weights_dir, hub=engines.hub)

    def load(i: int):
        return decode_image(files[i])

    log.info(
        "distilling %s (%s) on %d images for %d steps", loaded.arch, loaded.source, len(files), config.steps
    )
    _, losses = distill(
        loaded.model,
        load,
        len(files),
        config,
        device=device,
        out=out,
        save_every=args.save_every,
        progress=not args.no_progress,
    )
    k = max(1, min(20, len(losses) // 5))
    print(
        f"wrote {out}: loss {sum(losses[:k]) / k:.4f} (first {k} steps) -> "
        f"{sum(losses[-k:]) / k:.4f} (last {k}); use it with --model {model_name} --pretrained {out}"
    )
    return 0
