"""Generated scenes with known masks: coloured shapes on textured, cluttered backgrounds.

They serve two purposes: training a tiny CLIP contrastively on (scene, caption) pairs, and measuring how
well a grounding method localises the named shapes on held-out scenes. Everything is drawn from a seeded
``numpy.random.Generator`` so a seed always gives the same scenes.

A scene holds 1-4 objects of varied sizes that may occlude each other, a background that is one of
several textures (value noise, stripes, checkerboard, gradient, colour blobs) whose colours are often
the objects' own colours (distractors), and small clutter strokes that belong to the background. The
shape is the class; its colour is a nuisance that captions mention most of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "moon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (145, 60, 185),
    "orange": (240, 135, 30),
    "white": (240, 240, 240),
}
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "checker", "gradient", "blobs")
BACKGROUND_WORDS: dict[str, str] = {
    "noise": "grainy",
    "stripes": "striped",
    "checker": "checkered",
    "gradient": "plain",
    "blobs": "spotted",
}
BACKGROUND_LABEL = 0  # label 0 = background, shape i = label i + 1


@dataclass
class Scene:
    """One generated image, its label map (0 = background, k = ``SHAPES[k-1]``) and a caption."""

    image: Image.Image
    labels: np.ndarray
    objects: list[tuple[str, str]] = field(default_factory=list)  # visible (colour, shape), drawing order
    background: str = "noise"
    caption: str = ""
    colour_labels: np.ndarray | None = None  # 0 = background, k = the k-th colour of ``COLOURS``


def _random_colour(rng: np.random.Generator, distractor_p: float) -> np.ndarray:
    """A background colour: often one of the object colours (muted or not), otherwise any colour."""
    if rng.random() < distractor_p:
        base = np.array(list(COLOURS.values())[rng.integers(len(COLOURS))], dtype=np.float32)
        grey = base.mean()
        mix = rng.uniform(0.0, 0.6)  # 0 = the exact object colour
        return base * (1 - mix) + grey * mix
    return rng.uniform(20, 235, size=3).astype(np.float32)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] of shape [size, size]."""
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int, kind: str, distractor_p: float) -> np.ndarray:
    """A float32 [size, size, 3] texture."""
    c1, c2 = _random_colour(rng, distractor_p), _random_colour(rng, distractor_p)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "noise":
        t = _value_noise(rng, size, int(rng.integers(3, 12)))[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 14)
        phase = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((np.sin(2 * math.pi * phase / period) > 0).astype(np.float32))[..., None]
    elif kind == "checker":
        cell = int(rng.integers(4, 12))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)[..., None]
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        proj = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
    elif kind == "blobs":
        t = _value_noise(rng, size, int(rng.integers(3, 7))) > rng.uniform(0.35, 0.65)
        t = t.astype(np.float32)[..., None]
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
    img = c1 * (1 - t) + c2 * t
    img += rng.normal(0, rng.uniform(3, 18), size=img.shape).astype(np.float32)  # grain
    return img


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``angle``."""

    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "square":
        s = r * 0.8
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        a, b = r, r * 0.33
        return rot(
            [
                (-b, -a),
                (b, -a),
                (b, -b),
                (a, -b),
                (a, b),
                (b, b),
                (b, a),
                (-b, a),
                (-b, b),
                (-a, b),
                (-a, -b),
                (-b, -b),
            ]
        )
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean [size, size] mask of one shape."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
        rr = 0.85 * r
        draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 127


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int, distractor_p: float) -> None:
    """Thin strokes and dots in place (part of the background)."""
    size = img.shape[0]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        colour = _random_colour(rng, distractor_p)
        draw.rectangle([0, 0, size, size], fill=0)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            draw.line([x0, y0, x1, y1], fill=255, width=int(rng.integers(1, 3)))
        else:
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(1, 2.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        m = np.asarray(canvas) > 127
        img[m] = colour


def caption_for(
    objects: list[tuple[str, str]], background: str, rng: np.random.Generator, colour_drop: float = 0.3
) -> str:
    """A caption naming every visible object, in a few phrasings; colours dropped now and then."""
    drop_colour = rng.random() < colour_drop
    order = rng.permutation(len(objects))
    phrases = [shape if drop_colour else f"{colour} {shape}" for colour, shape in (objects[i] for i in order)]
    named = [f"{'an' if p[0] in 'aeiou' else 'a'} {p}" for p in phrases]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + f" and {named[-1]}"
    style = rng.integers(3)
    if style == 0:
        return f"a photo of {listed}."
    if style == 1:
        return f"{listed} on a {BACKGROUND_WORDS[background]} background."
    return f"{listed}."


def make_scene(
    rng: np.random.Generator,
    size: int = 64,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    min_radius: float | None = None,
    max_radius: float | None = None,
    distractor_p: float = 0.45,
    clutter: tuple[int, int] = (0, 6),
    colour_drop: float = 0.3,
) -> Scene:
    """Draw one scene of ``size`` x ``size`` pixels from ``rng`` (radii in pixels; ``colour_drop`` is the
    chance that the caption names the shapes without their colours)."""
    min_radius = size * 0.09 if min_radius is None else min_radius
    max_radius = size * 0.26 if max_radius is None else max_radius
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    img = _background(rng, size, kind, distractor_p)
    _clutter(rng, img, int(rng.integers(clutter[0], clutter[1] + 1)), distractor_p)
    labels = np.zeros((size, size), dtype=np.uint8)
    colour_labels = np.zeros((size, size), dtype=np.uint8)
    colour_names = list(COLOURS)
    drawn: list[tuple[str, str, np.ndarray]] = []
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colour_names[rng.integers(len(colour_names))]
        r = rng.uniform(min_radius, max_radius)
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        mask = _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if not mask.any():
            continue
        base = np.array(COLOURS[colour], dtype=np.float32) * rng.uniform(0.8, 1.1)
        # shading across the object plus grain: objects are not flat colour fields
        yy, xx = np.nonzero(mask)
        shade = 1.0 + 0.15 * ((xx - cx) * rng.normal() + (yy - cy) * rng.normal()) / max(r, 1.0)
        pix = base[None, :] * shade[:, None] + rng.normal(0, 8, size=(len(xx), 3))
        img[yy, xx] = pix
        labels[mask] = SHAPES.index(shape) + 1
        colour_labels[mask] = colour_names.index(colour) + 1
        drawn.append((colour, shape, mask))
    # an object counts only if a useful part of it stays visible after later objects occluded it
    visible: list[tuple[str, str]] = []
    for i, (colour, shape, mask) in enumerate(drawn):
        later = np.zeros_like(mask)
        for _, _, m in drawn[i + 1 :]:
            later |= m
        if (mask & ~later).sum() >= max(12, 0.3 * mask.sum()):
            visible.append((colour, shape))
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    if not visible:  # everything occluded: caption the last object drawn, which is fully visible
        visible = [(drawn[-1][0], drawn[-1][1])] if drawn else []
    caption = (
        caption_for(visible, kind, rng, colour_drop) if visible else f"a {BACKGROUND_WORDS[kind]} background."
    )
    return Scene(image, labels, visible, kind, caption, colour_labels)


def make_scenes(count: int, seed: int, size: int = 64, **kwargs: object) -> list[Scene]:
    """``count`` scenes from ``seed`` (the same seed always gives the same scenes)."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, **kwargs) for _ in range(count)]  # type: ignore[arg-type]


def instance_masks(scene: Scene, min_area: int = 12) -> list[np.ndarray]:
    """The scene's visible objects as masks: connected parts of one (shape, colour) pair."""
    import cv2

    out = []
    pairs = scene.labels.astype(np.int32) * 64 + scene.colour_labels.astype(np.int32)
    for value in np.unique(pairs[scene.labels > 0]):
        n, comp, stats, _ = cv2.connectedComponentsWithStats(
            (pairs == value).astype(np.uint8), connectivity=8
        )
        out += [comp == k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= min_area]
    return out
