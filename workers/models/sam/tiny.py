"""A tiny promptable SAM trained on generated scenes, for the offline refinement and click tests.

An ordinary ``transformers.SamModel`` at a tiny size (a 4-block ViT on 8-pixel patches of a 96-pixel
input) learns point and box prompts → the prompted shape's mask on the scenes of
:mod:`workers.evaluation.scenes`. Each training prompt is one of: a click inside the object (sometimes
with a second click, sometimes with a click outside it), its box (jittered), or the box and peak points
of a *coarse* version of its mask (the mask pooled to the tiny CLIP's patch grid and upsampled, as GEM's
maps look). With ``--gem-clip``, part of each batch is what ``refine=sam`` really sends (:class:`GemParts`):
the parts of GEM's label maps, an object's or, for a part GEM put on the background, an empty target. The
loss: binary cross-entropy + dice on the best of the three
candidate masks (SAM's focal loss starts too slowly for a few minutes of training), and the predicted IoU's
squared error.

Train it with ``groundlabel train-tiny-sam --out tests/assets/tiny_sam.pt`` (deterministic for a given seed
and thread count); ``--init`` continues from an earlier checkpoint on fresh scenes (the asset's six stages
are in docs/sam.md).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from groundlabel.errors import UserError

log = logging.getLogger(__name__)

#: Scenes are drawn at the tiny CLIP's input size; SAM sees them upsampled to ``TINY_INPUT``.
SCENE_SIZE = 48
TINY_INPUT = 96
#: The tiny CLIP's patch grid (48 px / 8 px): coarse training masks are pooled to it.
COARSE_GRID = 6


def tiny_sam_config(
    image_size: int = TINY_INPUT, width: int = 64, layers: int = 4, patch_size: int = 8
) -> Any:
    """The tiny ``SamConfig``: ``layers`` ViT blocks of ``width`` on ``patch_size``-pixel patches."""
    import transformers as t

    vision = t.SamVisionConfig(
        hidden_size=width, output_channels=width, num_hidden_layers=layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, window_size=6,
        global_attn_indexes=list(range(1, layers, 2)), num_pos_feats=width // 2, mlp_dim=2 * width,
        initializer_range=0.02,
    )  # fmt: skip
    prompt = t.SamPromptEncoderConfig(hidden_size=width, image_size=image_size, patch_size=patch_size)
    decoder = t.SamMaskDecoderConfig(
        hidden_size=width, mlp_dim=4 * width, num_attention_heads=4, iou_head_hidden_dim=width
    )
    return t.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def coarse_mask(mask: np.ndarray, grid: int = COARSE_GRID, threshold: float = 0.5) -> np.ndarray:
    """``mask`` as a patch-resolution model sees it: pooled to ``grid`` × ``grid``, upsampled, thresholded."""
    from PIL import Image

    h, w = mask.shape
    small = Image.fromarray(mask.astype(np.float32)).resize((grid, grid), Image.BOX)
    big = np.asarray(small.resize((w, h), Image.BILINEAR))
    return big >= threshold


def training_prompt(rng: np.random.Generator, mask: np.ndarray) -> Any:
    """One random prompt for ``mask`` (see the module docstring)."""
    from .engine import Prompt
    from .refine import mask_parts

    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    kind = rng.random()
    if kind < 0.35:  # clicks
        i = rng.integers(len(xs))
        points, labels = [(xs[i] + rng.random(), ys[i] + rng.random())], [1]
        if rng.random() < 0.3:
            j = rng.integers(len(xs))
            points.append((xs[j] + rng.random(), ys[j] + rng.random()))
            labels.append(1)
        if rng.random() < 0.3:
            oy, ox = np.nonzero(~mask)
            k = rng.integers(len(ox))
            points.append((ox[k] + rng.random(), oy[k] + rng.random()))
            labels.append(0)
        return Prompt(points, labels)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    if kind < 0.6:  # a jittered box
        jitter = 0.1 * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0]) * rng.normal(size=4)
        box = np.clip(np.array([x0, y0, x1, y1], dtype=np.float64) + jitter, 0, [w, h, w, h])
        return Prompt(
            box=(float(box[0]), float(box[1]), max(float(box[2]), box[0] + 1), max(float(box[3]), box[1] + 1))
        )
    parts = mask_parts(coarse_mask(mask, threshold=float(rng.uniform(0.3, 0.6))))
    if not parts:
        return Prompt(box=(float(x0), float(y0), float(x1), float(y1)))
    return max(parts, key=lambda p: int((p.mask & mask).sum())).prompt


class GemParts:
    """Prompts exactly as ``refine=sam`` sends them: the connected parts of GEM's label maps (the tiny CLIP,
    with or without PAMR) of freshly generated scenes. A part over an object of its colour has that object
    as its target (the one it overlaps most); a part on the background (a distractor GEM took for an
    object) has an empty target, so the tiny SAM learns to predict a low IoU there."""

    def __init__(self, clip_checkpoint: str | Path, *, temperature: float = 80.0, positive: float = 0.5):
        from workers.evaluation.sam_quality import tiny_gem

        self.engines = [
            tiny_gem(str(clip_checkpoint), temperature=temperature, pamr=pamr) for pamr in (False, True)
        ]
        self.positive = positive
        self.calls = 0

    def draw(self, rng: np.random.Generator, n: int) -> list[tuple[Any, Any, np.ndarray]]:
        """``n`` (scene, prompt, target mask) triples, from GEM and GEM + PAMR in turn."""
        from workers.evaluation.sam_quality import label_map
        from workers.evaluation.scenes import COLOURS, instance_masks, make_scene

        from .refine import mask_parts

        engine = self.engines[self.calls % 2]
        self.calls += 1
        out: list[tuple[Any, Any, np.ndarray]] = []
        while len(out) < n:
            scenes = [make_scene(rng, SCENE_SIZE) for _ in range(n)]
            for scene, scores in zip(scenes, engine.heatmaps([s.image for s in scenes], list(COLOURS)),
                                     strict=True):  # fmt: skip
                labels = label_map(scores, float(rng.uniform(0.5, 0.75)))
                objects = instance_masks(scene, min_area=1)
                colours = [int(np.bincount(scene.colour_labels[o]).argmax()) for o in objects]
                pos, neg = [], []
                for c in (int(c) for c in np.unique(labels) if c):
                    for part in mask_parts(labels == c, scores[c - 1]):
                        overlap = [
                            int((part.mask & o).sum()) if k == c else 0
                            for o, k in zip(objects, colours, strict=True)
                        ]
                        if overlap and max(overlap) > 0:
                            pos.append((part.prompt, objects[int(np.argmax(overlap))]))
                        else:
                            neg.append((part.prompt, np.zeros_like(part.mask)))
                pool = pos if pos and (not neg or rng.random() < self.positive) else neg
                if pool and len(out) < n:
                    prompt, target = pool[rng.integers(len(pool))]
                    out.append((scene, prompt, target))
        return out


def train_tiny_sam(
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup: int = 50,
    seed: int = 1,
    threads: int | None = None,
    width: int = 64,
    layers: int = 4,
    image_size: int = TINY_INPUT,
    patch_size: int = 8,
    init: str | Path | None = None,
    gem_clip: str | Path | None = None,
    gem_fraction: float = 0.5,
    single_mask: bool = False,
    log_every: int = 50,
    save_every: int = 0,
    out: str | Path | None = None,
) -> tuple[Any, dict]:
    """Train the tiny SAM on freshly generated scenes (training seed ``seed``, never the held-out one);
    the learning rate warms up, then decays with a cosine. ``init``: a checkpoint to continue from (its
    architecture; ``width``, ``layers``, ``image_size`` and ``patch_size`` are then ignored). ``gem_clip``:
    a tiny CLIP checkpoint; ``gem_fraction`` of each batch is then :class:`GemParts` prompts.
    ``single_mask`` (with ``init``): train only SAM's single-mask answer, the one a box or several points
    get (:func:`single_mask_parameters`), every other weight frozen, so that the three-mask answers stay
    exactly those of ``init``. Returns the model (eval) and a summary."""
    import torch
    import torch.nn.functional as F

    from workers.evaluation.scenes import instance_masks, make_scene

    from .engine import SamEngine, load_checkpoint, save_checkpoint

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from transformers import SamModel

    if init:
        model, _ = load_checkpoint(init)
    elif single_mask:
        raise UserError("training the single-mask answer alone needs a trained checkpoint to continue (init)")
    else:
        model = SamModel(tiny_sam_config(image_size, width, layers, patch_size))
        with torch.no_grad():  # SAM's random Fourier features at scale 1, as the original code draws them:
            # transformers draws them at hidden_size / 2, so high in frequency that no position generalises
            model.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)
    engine = SamEngine(_train_config(), model=model, family_name="sam")
    gem_parts = GemParts(gem_clip) if gem_clip else None
    n_gem = int(round(gem_fraction * batch_size)) if gem_parts else 0
    if single_mask:
        hyper, head = single_mask_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in (*hyper, *head):
            p.requires_grad_(True)
        for p in head:  # the rows of the three masks' IoUs keep their values: no gradient, no weight decay
            p.register_hook(_first_row_only)
        groups = [{"params": hyper, "weight_decay": 0.01}, {"params": head, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    loss_ema = iou_ema = float("nan")
    model.train()
    for step in range(steps):
        frac = min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        pixels, targets, prompts = [], [], []
        if n_gem:
            for scene, prompt, mask in gem_parts.draw(rng, n_gem):
                pixels.append(engine.preprocess(scene.image))
                targets.append(mask)
                prompts.append(prompt)
        while len(prompts) < batch_size:
            scene = make_scene(rng, SCENE_SIZE)
            masks = instance_masks(scene)
            if not masks:
                continue
            mask = masks[rng.integers(len(masks))]
            pixels.append(engine.preprocess(scene.image))
            targets.append(mask)
            prompts.append(training_prompt(rng, mask))
        x = torch.cat(pixels)
        target = torch.from_numpy(np.stack(targets)).float()[:, None]  # [B, 1, 48, 48]
        logits, pred_iou = _forward(engine, x, prompts, multimask=not single_mask)  # [B, M, m, m], [B, M]
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        t = target.expand_as(logits)
        prob = logits.sigmoid()
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").flatten(2).mean(-1)
        inter = (prob * t).flatten(2).sum(-1)
        dice = 1 - (2 * inter + 1) / (prob.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
        per_mask = bce + dice  # [B, 3]
        best = per_mask.argmin(1)
        with torch.no_grad():
            hard = (logits > 0).float()
            true_iou = (hard * t).flatten(2).sum(-1) / ((hard + t) > 0).float().flatten(2).sum(-1).clamp_min(
                1
            )
        rows = torch.arange(len(best))
        loss = per_mask[rows, best].mean() + F.mse_loss(pred_iou, true_iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value, iou = float(loss.detach()), float(true_iou[rows, best].mean())
        loss_ema = value if np.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        iou_ema = iou if np.isnan(iou_ema) else 0.95 * iou_ema + 0.05 * iou
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("step %d/%d loss %.3f mask IoU %.3f (%.0fs)", step + 1, steps, loss_ema, iou_ema,
                     time.perf_counter() - start)  # fmt: skip
        if save_every and out and (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(out, model, "sam", {"steps": step + 1, "loss": loss_ema})
    model.eval()
    vision = model.config.vision_config
    summary = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "width": vision.hidden_size,
        "layers": vision.num_hidden_layers, "image_size": vision.image_size, "patch_size": vision.patch_size,
        "init": Path(init).name if init else None, "gem_fraction": gem_fraction if gem_parts else 0.0,
        "single_mask": single_mask,
        "loss": loss_ema, "train_mask_iou": iou_ema,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    if out:
        save_checkpoint(out, model, "sam", summary)
    return model, summary


def single_mask_parameters(model: Any) -> tuple[list[Any], list[Any]]:
    """What makes SAM's single-mask answer (``multimask_output=False``: mask token 0) and nothing else: the
    hypernetwork MLP of mask token 0, and the IoU head's last layer, whose first row alone predicts that
    mask's IoU. Training these never changes the three-mask answers."""
    decoder = model.mask_decoder
    head = decoder.iou_prediction_head.proj_out
    return list(decoder.output_hypernetworks_mlps[0].parameters()), [head.weight, head.bias]


def _first_row_only(grad: Any) -> Any:
    """The gradient of the first row alone (the others zero)."""
    out = grad.clone()
    out[1:] = 0
    return out


def _train_config() -> Any:
    from .config import SamConfig

    return SamConfig(model=None, family="sam", device="cpu", cache_bytes=0)


def _forward(engine: Any, pixels: Any, prompts: list, multimask: bool = True) -> tuple[Any, Any]:
    """Mask logits ``[B, M, m, m]`` and predicted IoUs ``[B, M]`` (M = 3 with ``multimask``, else 1), one
    prompt per image (with gradients)."""
    import torch

    n = max(len(p.points) for p in prompts)
    size = SCENE_SIZE
    points = np.zeros((len(prompts), 1, max(n, 1), 2), dtype=np.float32)
    labels = np.full((len(prompts), 1, max(n, 1)), -10, dtype=np.int64)
    boxes = np.zeros((len(prompts), 1, 4), dtype=np.float32)
    has_box = np.array([p.box is not None for p in prompts])
    for i, p in enumerate(prompts):
        if p.points:
            points[i, 0, : len(p.points)] = engine._to_input(np.asarray(p.points, np.float32), size, size)
            labels[i, 0, : len(p.labels)] = p.labels
        if p.box is not None:
            boxes[i, 0] = engine._to_input(np.asarray(p.box, np.float32).reshape(2, 2), size, size).ravel()
    emb = engine.model.vision_encoder(pixels)[0]  # what get_image_embeddings returns, with gradients
    outs_l, outs_i, order = [], [], []
    for flag in (False, True):
        idx = np.nonzero(has_box == flag)[0]
        if not len(idx):
            continue
        kwargs: dict[str, Any] = {}
        if n:
            kwargs["input_points"] = torch.from_numpy(points[idx])
            kwargs["input_labels"] = torch.from_numpy(labels[idx])
        if flag:
            kwargs["input_boxes"] = torch.from_numpy(boxes[idx, 0])[:, None]
        res = engine.model(image_embeddings=emb[torch.from_numpy(idx)], multimask_output=multimask, **kwargs)
        outs_l.append(res.pred_masks[:, 0])
        outs_i.append(res.iou_scores[:, 0])
        order.extend(idx.tolist())
    inverse = torch.as_tensor(np.argsort(order))
    logits = torch.cat(outs_l)[inverse]
    return logits, torch.cat(outs_i)[inverse]


def _train_command(args: argparse.Namespace) -> int:
    _, summary = train_tiny_sam(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
        width=args.width, layers=args.layers, image_size=args.image_size, patch_size=args.patch_size,
        init=args.init, gem_clip=args.gem_clip, gem_fraction=args.gem_fraction, single_mask=args.single_mask,
        save_every=args.save_every, out=args.out,
    )  # fmt: skip
    size = Path(args.out).stat().st_size / 2**20
    print(
        f"wrote {args.out} ({size:.1f} MiB): loss {summary['loss']:.3f}, "
        f"training mask IoU {summary['train_mask_iou']:.3f}, {summary['seconds']:.0f} s"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train-tiny-sam`` verb."""
    p = subparsers.add_parser(
        "train-tiny-sam",
        help="train the tiny promptable SAM used by the offline refinement tests",
        description="Train a tiny SamModel on generated scenes: point and box prompts → the shape's mask "
        "(CPU is enough: minutes per thousand steps).",
    )
    p.add_argument("--out", default="tests/assets/tiny_sam.pt", help="checkpoint to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--seed", type=int, default=1, help="training scenes' seed (the held-out scenes use another)"
    )
    p.add_argument("--width", type=int, default=64, help="ViT, prompt encoder and mask decoder width")
    p.add_argument("--layers", type=int, default=4, help="ViT blocks")
    p.add_argument("--image-size", type=int, default=TINY_INPUT, help="network input size (scenes are 48 px)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch size in input pixels")
    p.add_argument("--init", default=None, help="a train-tiny-sam checkpoint to continue training from")
    p.add_argument(
        "--gem-clip", default=None,
        help="a tiny CLIP checkpoint: part of each batch is then the parts of GEM's label maps "
        "(refine=sam's prompts)",
    )  # fmt: skip
    p.add_argument("--gem-fraction", type=float, default=0.5, help="share of each batch from --gem-clip")
    p.add_argument(
        "--single-mask", action="store_true",
        help="with --init: train only the single-mask answer (boxes, several points), every other weight "
        "frozen, so that the three-mask answers do not change",
    )  # fmt: skip
    p.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    p.set_defaults(handler=_train_command)
