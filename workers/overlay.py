"""Overlays a person can look at: the image with its regions, and one heatmap panel per prompt.

``render_overlay(image, heatmaps, results)`` returns one RGB image laid out as a grid: the first panel is
the image with every region drawn (polygons and brush masks filled translucently, boxes, key points,
each with its label and score), the others show each prompt's calibrated score map as a colour map
(turbo: dark blue = 0, red = 1) over a grey copy of the image, with a colour bar and the map's maximum.
Drawing uses Pillow and OpenCV only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from groundlabel.ls_format import brush_rle_decode, percent_to_pixels

#: Distinct colours for labels, in order of first appearance.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)
CAPTION_HEIGHT = 22
COLORBAR_HEIGHT = 10
GAP = 6


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def colormap(scores: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] to an RGB uint8 image (OpenCV's turbo colour map)."""
    u8 = np.clip(np.nan_to_num(scores) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)


def _label_of(result: dict[str, Any]) -> str:
    labels = result.get("value", {}).get(result.get("type", ""), [])
    return str(labels[0]) if labels else "?"


def _text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font) -> None:
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=fill)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    draw.text((x, y), text, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255), font=font)


def draw_regions(
    image: Image.Image, results: Sequence[dict[str, Any]], colours: dict[str, tuple[int, int, int]]
) -> Image.Image:
    """The image (any size) with Label Studio results drawn on it; percent coordinates scale to it."""
    base = image.convert("RGB")
    w, h = base.size
    fill_layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill_draw = ImageDraw.Draw(fill_layer)
    line_width = max(2, round(max(w, h) / 300))
    font = _font(max(11, min(18, round(max(w, h) / 40))))
    captions: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    lines: list[tuple[str, Any, tuple[int, int, int]]] = []
    for r in results:
        label = _label_of(r)
        colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
        value = r.get("value", {})
        caption = f"{label} {r['score']:.2f}" if "score" in r else label
        kind = r.get("type")
        if kind == "polygonlabels":
            pts = percent_to_pixels(value.get("points", []), w, h)
            if len(pts) >= 3:
                poly = [tuple(p) for p in pts.tolist()]
                fill_draw.polygon(poly, fill=colour + (90,))
                lines.append(("polygon", poly, colour))
                top = pts[np.argmin(pts[:, 1])]
                captions.append(((float(top[0]), float(top[1])), caption, colour))
        elif kind == "rectanglelabels":
            x0, y0 = value["x"] * w / 100, value["y"] * h / 100
            x1, y1 = x0 + value["width"] * w / 100, y0 + value["height"] * h / 100
            lines.append(("box", (x0, y0, x1, y1), colour))
            captions.append(((x0, y0), caption, colour))
        elif kind == "keypointlabels":
            x, y = value["x"] * w / 100, value["y"] * h / 100
            radius = max(5.0, line_width * 3.0)
            lines.append(("point", (x - radius, y - radius, x + radius, y + radius), colour))
            font_size = getattr(font, "size", 14)
            captions.append(((x + radius + 4, y + (font_size + 4) / 2), caption, colour))
        elif kind == "brushlabels":
            ow, oh = int(r.get("original_width", w)), int(r.get("original_height", h))
            mask = brush_rle_decode(value.get("rle", []), oh, ow)
            mask_img = Image.fromarray(mask.astype(np.uint8) * 110).resize((w, h), Image.Resampling.NEAREST)
            fill_layer.paste(Image.new("RGBA", (w, h), colour + (255,)), (0, 0), mask_img)
            ys, xs = np.nonzero(mask)
            if ys.size:
                k = int(np.argmin(ys))
                captions.append(((xs[k] * w / ow, ys[k] * h / oh), caption, colour))
    out = Image.alpha_composite(base.convert("RGBA"), fill_layer).convert("RGB")
    draw = ImageDraw.Draw(out)
    for kind, geom, colour in lines:
        if kind == "polygon":
            draw.line(geom + [geom[0]], fill=colour, width=line_width, joint="curve")
        elif kind == "box":
            draw.rectangle(geom, outline=colour, width=line_width)
        else:
            x0, y0, x1, y1 = geom
            draw.ellipse((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
            draw.ellipse(geom, fill=colour, outline=(255, 255, 255), width=max(1, line_width // 2))
    for (x, y), text, colour in captions:
        tx = float(np.clip(x, 0, max(0, w - 10)))
        ty = float(np.clip(y - font.size - 4 if hasattr(font, "size") else y - 14, 0, max(0, h - 10)))
        _text_box(draw, (tx, ty), text, colour, font)
    return out


def heatmap_panel(image: Image.Image, scores: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """A grey copy of ``image`` blended with the colour-mapped ``scores`` (resized to the image)."""
    w, h = image.size
    s = np.asarray(scores, dtype=np.float32)
    if s.shape != (h, w):
        s = cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR)
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * grey + alpha * colormap(s).astype(np.float32)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def _colorbar(width: int) -> Image.Image:
    ramp = np.tile(np.linspace(0.0, 1.0, max(width, 2), dtype=np.float32), (COLORBAR_HEIGHT, 1))
    return Image.fromarray(colormap(ramp))


def render_overlay(
    image: Image.Image,
    heatmaps: Mapping[str, np.ndarray] | None,
    results: Sequence[dict[str, Any]],
    *,
    max_side: int = 512,
    columns: int = 3,
    title: str | None = None,
) -> Image.Image:
    """One RGB image: regions on the image, then one heatmap panel per prompt, in a grid.

    Panels are scaled so that their longer side is at most ``max_side`` pixels.
    """
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    small = image.convert("RGB")
    if scale < 1:
        small = small.resize((pw, ph), Image.Resampling.BILINEAR)
    font = _font(13)
    colours: dict[str, tuple[int, int, int]] = {}
    panels: list[tuple[str, Image.Image, Image.Image | None]] = []
    n_regions = len(results)
    regions_caption = f"{n_regions} region{'s' if n_regions != 1 else ''}"
    if title:
        regions_caption = f"{title}: {regions_caption}"
    panels.append((regions_caption, draw_regions(small, results, colours), None))
    for prompt, scores in (heatmaps or {}).items():
        s = np.asarray(scores, dtype=np.float32)
        peak = float(np.nanmax(s)) if s.size else 0.0
        panels.append((f"{prompt}  (max {peak:.2f})", heatmap_panel(small, s), _colorbar(pw)))

    cols = max(1, min(columns, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    cell_w, cell_h = pw, CAPTION_HEIGHT + ph + COLORBAR_HEIGHT + GAP
    canvas = Image.new("RGB", (cols * cell_w + (cols + 1) * GAP, rows * cell_h + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (caption, panel, bar) in enumerate(panels):
        r, c = divmod(k, cols)
        x0, y0 = GAP + c * (cell_w + GAP), GAP + r * cell_h
        text = caption
        while len(text) > 4 and draw.textlength(text, font=font) > cell_w:
            text = text[:-2]
        if text != caption:
            text = text[:-1] + "…"
        draw.text((x0, y0 + 3), text, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x0, y0 + CAPTION_HEIGHT))
        if bar is not None:
            canvas.paste(bar, (x0, y0 + CAPTION_HEIGHT + ph))
    return canvas
