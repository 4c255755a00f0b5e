"""Decoding a task's image safely: size and pixel limits, RGB, EXIF orientation.

:func:`decode_image` refuses, with the reason, an input that is empty, larger than ``max_bytes``, not an
image, truncated or corrupt, or whose header announces more than ``max_pixels`` pixels. The pixel
count is checked on the header, before any pixel is decoded, so a small file claiming 30000×30000
pixels costs nothing. Pillow's own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) still
applies on top of ours; its warning is silenced because our limit is the one that decides.

Limits (per call; the workers pass their fetch settings' ``GROUNDLABEL_MAX_IMAGE_BYTES`` and
``GROUNDLABEL_MAX_IMAGE_PIXELS``): by default 50 MiB and 100 million pixels
(:mod:`groundlabel.limits`).

Every image comes back as 8-bit RGB: CMYK, YCbCr, palette and grey images are converted; alpha is
composited over white; 16-bit and 32-bit grey images are scaled to 8 bits (not clipped); float images
are scaled from 0..1 when their maximum is at most 1, otherwise clipped to 0..255. Multi-frame images
(GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from groundlabel.errors import UserError
from groundlabel.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

_WHITE = (255, 255, 255)


class ImageError(UserError):
    """An image cannot be used; the message gives the reason (and the file, when there is one)."""


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _read_source(data: bytes | bytearray | memoryview | str | Path, max_bytes: int) -> tuple[bytes, str]:
    """The raw bytes and a name for messages; the size limit is checked before reading a file."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise ImageError(f"the image is {_mb(len(raw))}, more than the limit of {_mb(max_bytes)}")
        return raw, "the image"
    if isinstance(data, str) and data.split("://", 1)[0].lower() in ("http", "https", "s3", "gs"):
        raise ImageError(f"{data!r} is a URL, not a file: fetch it first (workers.fetch)")
    if not isinstance(data, (str, Path)):
        raise TypeError(f"decode_image takes bytes or a file path, got {type(data).__name__}")
    path = Path(data)
    name = str(data)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file") from exc
    except OSError as exc:
        raise ImageError(f"{name}: cannot be read ({exc.strerror or exc})") from exc
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image")
    if size > max_bytes:
        raise ImageError(f"{name}: the file is {_mb(size)}, more than the limit of {_mb(max_bytes)}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{name}: cannot be read ({exc.strerror or exc})") from exc
    return raw, name


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode != "I" or top > 255:
            scale = 65535.0 if top <= 65535 else float(2**32 - 1)
            arr = arr * (255.0 / scale)
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes | str | Path,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode image bytes or an image file into an RGB ``PIL.Image`` with EXIF orientation applied.

    ``max_bytes`` / ``max_pixels`` default to :data:`DEFAULT_MAX_BYTES` / :data:`DEFAULT_MAX_PIXELS`.
    Raises :class:`ImageError` (a ``UserError``) giving the reason.
    """
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    raw, name = _read_source(data, max_bytes)
    if not raw:
        raise ImageError(f"{name}: is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(raw))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise ImageError(
                f"{name}: refused as a decompression bomb: its header announces more pixels than Pillow's "
                f"limit ({exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: is not an image Pillow can read (format not recognised)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: the image header is corrupt ({exc})") from exc
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name}: the image header gives an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: the image is {width}x{height} = {width * height:,} pixels, more than the limit "
                f"of {max_pixels:,} pixels"
            )
        try:
            im.seek(0)
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ImageError(f"{name}: the image data is truncated or corrupt ({reason})") from exc
    # a broken EXIF block must not lose an otherwise good image
    with contextlib.suppress(Exception):
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)
