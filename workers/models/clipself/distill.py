"""CLIPSelf self-distillation of a CLIP ViT's dense features on unlabelled images.

One step, per image: a random m×n grid (m in 1..``max_split``, n in ⌈m/2⌉..min(2m, ``max_split``)), up to
``max_boxes`` of its cells. The frozen teacher (a copy of the starting model) encodes each cell, cropped from
the image and resized to ``crop_size``, with CLIP's ordinary ``encode_image``. The student encodes the whole
image at ``image_size`` into a dense map (CLIPSelf's ``encode_dense``: the last block's value path, see the
``clipself`` method of :class:`~workers.models.gem.GemVisionTower`), L2-normalised; RoIAlign (1×1,
``aligned=True``) pools it in each cell. Loss = 1 - mean cosine(student cell, teacher cell).

Trainable: the image tower's blocks, ``ln_post`` and ``proj``; the patch and position embeddings, ``ln_pre``
and the text tower stay frozen. The saved weights are CLIPSelf's weight-space ensemble
``alpha·student + (1 - alpha)·teacher``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlabel.errors import UserError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FROZEN_VISUAL = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patch_embed", "pos_embed")


@dataclass
class DistillConfig:
    """Settings of a distillation run (defaults: CLIPSelf's ViT-B/16 recipe where it applies)."""

    steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 100
    batch_size: int = 2
    image_size: int = 1024
    crop_size: int | None = None  # the model's own input size when None
    max_split: int = 6
    max_boxes: int = 20
    ensemble_alpha: float = 0.7
    seed: int = 0

    def validate(self) -> None:
        """Raise ``UserError`` with the reason for an out-of-range value."""
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.image_size < 16 or (self.crop_size is not None and self.crop_size < 16):
            raise UserError("image size and crop size must be at least 16 pixels")
        if self.max_split < 1 or self.max_boxes < 1:
            raise UserError("max_split and max_boxes must be >= 1")
        if not 0.0 <= self.ensemble_alpha <= 1.0:
            raise UserError(f"ensemble alpha must lie in [0, 1], got {self.ensemble_alpha}")


def grid_boxes(rng: random.Random, width: int, height: int, max_split: int, max_boxes: int) -> np.ndarray:
    """Cells ``[K, 4]`` (x0, y0, x1, y1 in pixels) of a random m×n grid over a ``width × height`` image."""
    m = rng.randint(1, max_split)
    n = rng.randint(math.ceil(m / 2), min(2 * m, max_split))
    rows, cols = (m, n) if rng.random() < 0.5 else (n, m)
    xs = np.linspace(0, width, cols + 1)
    ys = np.linspace(0, height, rows + 1)
    cells = [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    return np.asarray(cells[:max_boxes], dtype=np.float32)


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Bicubic resize to ``size × size``, OpenAI mean/std → ``[B, 3, size, size]``."""
    arrs = [
        np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def model_input_size(model: Any) -> int:
    """The CLIP image tower's native input size."""
    size = getattr(model.visual, "image_size", None)
    if size is None and hasattr(model.visual, "trunk"):
        size = model.visual.trunk.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def dense_map(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """CLIPSelf's dense features ``[B, D, gh, gw]`` (L2-normalised) of ``pixels``."""
    from workers.models.clipself.eva import EvaDenseTower, is_timm_eva
    from workers.models.gem import GemVisionTower

    visual = model.visual
    if is_timm_eva(visual):
        tower = EvaDenseTower(visual)
        tokens, grid = tower.dense_tokens(pixels)
    else:
        tower = GemVisionTower(visual, gem_depth=2)
        tokens = tower.dense_features(pixels, "clipself")[:, 1:]
        grid = tower.grid_for(pixels.shape[-2], pixels.shape[-1])
    feats = F.normalize(tokens, dim=-1)
    return feats.transpose(1, 2).reshape(feats.shape[0], -1, *grid)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Freeze everything but the image tower's blocks and head; return the trainable parameters."""
    params = []
    for name, p in model.named_parameters():
        train = name.startswith("visual.") and not name[len("visual.") :].replace("trunk.", "").startswith(
            FROZEN_VISUAL
        )
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def distill_step(
    student: Any,
    teacher: Any,
    images: Sequence[Image.Image],
    rng: random.Random,
    config: DistillConfig,
    crop_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The CLIPSelf loss of one batch (with the graph, for ``backward``)."""
    from torchvision.ops import roi_align

    crops, rois = [], []
    size = config.image_size
    for b, im in enumerate(images):
        boxes = grid_boxes(rng, im.width, im.height, config.max_split, config.max_boxes)
        for x0, y0, x1, y1 in boxes:
            box = (
                int(round(x0)),
                int(round(y0)),
                max(int(round(x1)), int(round(x0)) + 1),
                max(int(round(y1)), int(round(y0)) + 1),
            )
            crops.append(im.crop(box))
        scale = np.array([size / im.width, size / im.height] * 2, dtype=np.float32)
        rois.append(np.concatenate([np.full((len(boxes), 1), b, np.float32), boxes * scale], axis=1))
    with torch.no_grad():
        target = F.normalize(teacher.encode_image(to_tensor(crops, crop_size).to(device)).float(), dim=-1)
    dense = dense_map(student, to_tensor(images, size).to(device))
    grid_scale = dense.shape[-1] / size
    roi = torch.from_numpy(np.concatenate(rois)).to(device)
    pooled = roi_align(dense.float(), roi, (1, 1), spatial_scale=grid_scale, sampling_ratio=-1, aligned=True)
    pooled = F.normalize(pooled.flatten(1), dim=-1)
    return 1.0 - (pooled * target).sum(dim=-1).mean()


def ensemble_state(student: Any, teacher: Any, alpha: float) -> dict[str, torch.Tensor]:
    """``alpha·student + (1 - alpha)·teacher`` for floating-point entries (float32, on the CPU)."""
    t_state = teacher.state_dict()
    out = {}
    for k, v in student.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = (alpha * v.float() + (1.0 - alpha) * t_state[k].detach().cpu().float()).contiguous()
        out[k] = v
    return out


def distill(
    model: Any,
    images: Sequence[Image.Image] | Callable[[int], Image.Image],
    num_images: int,
    config: DistillConfig,
    *,
    device: torch.device | str = "cpu",
    out: str | Path | None = None,
    save_every: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Distil ``model`` in place on the images (a sequence, or a loader ``i → image``); returns the
    ensembled state dict (also written to ``out``) and the loss of every step (``on_step(step, loss)``
    hears each one as it comes)."""
    from tqdm import tqdm

    config.validate()
    if num_images < 1:
        raise UserError("distillation needs at least one image")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    load = images if callable(images) else images.__getitem__
    model = model.to(device)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(model)
    crop_size = config.crop_size or model_input_size(model)
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup, max(0, config.steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="distill", unit="step", disable=not progress)
    for step in bar:
        batch = [load(rng.randrange(num_images)) for _ in range(config.batch_size)]
        loss = distill_step(model, teacher, batch, rng, config, crop_size, device)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(step, losses[-1])
        if out is not None and save_every and (step + 1) % save_every == 0 and step + 1 < config.steps:
            save_state(ensemble_state(model, teacher, config.ensemble_alpha), out)
    model.eval()
    state = ensemble_state(model, teacher, config.ensemble_alpha)
    if out is not None:
        save_state(state, out)
    return state, losses


def save_state(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write an open_clip state dict (``.safetensors`` by suffix, else ``torch.save``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    log.info("wrote %s", path)
