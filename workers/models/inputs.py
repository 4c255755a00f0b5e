"""The checks every text-prompted engine (GEM, SAM 3) runs on its images and prompts before any work."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from groundlabel.errors import UserError


def check_images_and_prompts(
    images: Sequence[Image.Image], prompts: Sequence[str]
) -> tuple[list[Image.Image], list[str]]:
    """Both as lists, after refusing a non-image, an empty image, a bare string or a blank prompt."""
    if isinstance(prompts, str):
        raise UserError("prompts must be a sequence of strings, not one string")
    images, prompts = list(images), list(prompts)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise UserError(f"image {i} is a {type(im).__name__}, expected a PIL image")
        if im.width < 1 or im.height < 1:
            raise UserError(f"image {i} is empty ({im.width}x{im.height})")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"prompt {i} must be a non-empty string, got {p!r}")
    return images, prompts
