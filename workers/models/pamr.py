"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as TCL applies it to score maps.

For an image ``x [B, 3, H, W]`` and masks ``m [B, C, H, W]``:

1. every pixel gets 8 neighbours (the 3×3 ring) at each dilation, with replicate padding at the borders
   (6 dilations → 48 neighbours, the centre is not one of them);
2. affinity logits per colour channel ``-|x_i - x_j| / (1e-8 + 0.1·σ_i)``, where ``σ_i`` is the standard
   deviation (unbiased) of the 9-pixel neighbourhoods (centre included) of all dilations together;
3. the logits are averaged over the colour channels, then a softmax over the 48 neighbours gives weights;
4. the masks are propagated ``num_iter`` times: ``m_i ← Σ_j w_ij · m_j``.

The weights are a convex combination, so scores in [0, 1] stay in [0, 1]. Works batched on CPU and GPU;
the propagation loops over neighbours (memory stays at a few copies of the masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_DILATIONS", "DEFAULT_ITERS", "pamr", "pamr_affinity", "refine_scores"]

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
DEFAULT_ITERS = 10
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _offsets(dilations: Sequence[int], centre: bool) -> list[tuple[int, int]]:
    out = []
    for d in dilations:
        if centre:
            out.append((0, 0))
        out.extend((dy * d, dx * d) for dy, dx in _RING)
    return out


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    dil = tuple(int(d) for d in dilations)
    if not dil or min(dil) < 1:
        raise ValueError(f"PAMR dilations must be positive integers, got {tuple(dilations)!r}")
    return dil


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS) -> torch.Tensor:
    """Neighbour weights ``[B, 8·len(dilations), H, W]`` (softmax over the neighbour axis) of ``image``."""
    if image.dim() != 4:
        raise ValueError(f"PAMR expects an image [B, C, H, W], got shape {tuple(image.shape)}")
    dil = _check_dilations(dilations)
    x = image.float()
    h, w = x.shape[-2:]
    pad = max(dil)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    # σ over the 9-pixel neighbourhoods of all dilations (unbiased, as torch.std), per channel.
    every = _offsets(dil, centre=True)
    mean = torch.zeros_like(x)
    for dy, dx in every:
        mean += _shifted(padded, pad, dy, dx, h, w)
    mean /= len(every)
    var = torch.zeros_like(x)
    for dy, dx in every:
        var += (_shifted(padded, pad, dy, dx, h, w) - mean).square()
    var /= len(every) - 1
    denom = 1e-8 + 0.1 * var.sqrt()
    logits = torch.stack(
        [
            (-(x - _shifted(padded, pad, dy, dx, h, w)).abs() / denom).mean(dim=1)
            for dy, dx in _offsets(dil, centre=False)
        ],
        dim=1,
    )
    return logits.softmax(dim=1)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_iter: int = DEFAULT_ITERS,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> torch.Tensor:
    """Refine ``masks [B, C, h, w]`` with the affinities of ``image [B, 3, H, W]``; returns ``[B, C, H, W]``.

    Masks of another size are first resized to the image's (bilinear, ``align_corners=True``).
    """
    if masks.dim() != 4 or image.dim() != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(
            f"PAMR expects image [B, 3, H, W] and masks [B, C, h, w] with the same B, got "
            f"{tuple(image.shape)} and {tuple(masks.shape)}"
        )
    if num_iter < 0:
        raise ValueError(f"PAMR num_iter must be >= 0, got {num_iter}")
    dil = _check_dilations(dilations)
    h, w = image.shape[-2:]
    m = masks.float()
    if m.shape[-2:] != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
    if num_iter == 0 or m.shape[1] == 0:
        return m
    weights = pamr_affinity(image, dil).unsqueeze(2)  # [B, K, 1, H, W]
    offsets = _offsets(dil, centre=False)
    pad = max(dil)
    for _ in range(num_iter):
        padded = F.pad(m, (pad, pad, pad, pad), mode="replicate")
        out = torch.zeros_like(m)
        for j, (dy, dx) in enumerate(offsets):
            out.addcmul_(weights[:, j], _shifted(padded, pad, dy, dx, h, w))
        m = out
    return m


def refine_scores(
    rgb: torch.Tensor,
    scores: torch.Tensor,
    *,
    scale: float = 0.25,
    num_iter: int = DEFAULT_ITERS,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> torch.Tensor:
    """PAMR on score maps ``[C, gh, gw]`` for one image ``rgb [3, H, W]`` (values in [0, 1]) at ``scale`` of
    the image's size (never below the score grid); returns ``[C, h, w]`` at that working size."""
    h0, w0 = rgb.shape[-2:]
    gh, gw = scores.shape[-2:]
    h = max(gh, int(round(h0 * scale)))
    w = max(gw, int(round(w0 * scale)))
    small = rgb[None].float()
    if (h, w) != (h0, w0):
        small = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return pamr(small, scores[None], num_iter=num_iter, dilations=dilations)[0]
