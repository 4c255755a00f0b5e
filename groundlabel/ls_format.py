"""Label Studio's region format, written by the workers and read by the exporters.

Coordinates in Label Studio results are percent of the original image (0..100); ``original_width``
and ``original_height`` are pixels. Brush masks use Label Studio's own bit-packed RLE over RGBA
pixels (not COCO RLE): encoded with numpy (identical to label-studio-sdk's converter) and decoded by a
compiled loop (:mod:`groundlabel.jit`), or by label-studio-sdk's own decoder where numba is not installed
(the backend's base install).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from groundlabel.errors import UserError
from groundlabel.jit import compiled, numba_available

#: Result types that carry a region on an image.
REGION_TYPES = ("polygonlabels", "brushlabels", "rectanglelabels", "keypointlabels")


#: The largest project id accepted: Label Studio's ids are 32-bit database keys.
MAX_PROJECT_ID = 2**31 - 1
#: A project field as Label Studio writes it: the id in decimal, without leading zeros, optionally followed
#: by ``.<timestamp>`` (``/setup``, ``/predict`` and ``/train`` send ``"<id>.<created_at>"``).
_PROJECT_FIELD = re.compile(r"([1-9][0-9]{0,9})(?:\.[0-9]{1,20})?")


def project_id(value: Any) -> str:
    """The canonical spelling of a Label Studio project id: ``"41"`` for ``41``, ``"41"`` or
    ``"41.1712345678"``; a ``ValueError`` for anything else (``"0041"``, ``"4_1"``, ``True``, ``None``,
    ``41.0``, a number outside 1..:data:`MAX_PROJECT_ID`), so that one project has one name everywhere
    (training locks, statuses, metrics, the model store).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _PROJECT_FIELD.fullmatch(value)):
        number = int(match.group(1))
    else:
        raise ValueError(
            "a project id is a positive integer (or Label Studio's \"<id>.<timestamp>\"), "
            "written without leading zeros"
        )
    if not 1 <= number <= MAX_PROJECT_ID:
        raise ValueError(f"a project id lies in 1..{MAX_PROJECT_ID}")
    return str(number)


def new_region_id() -> str:
    """A short unique id for a result (Label Studio requires unique ids within a prediction)."""
    return uuid.uuid4().hex[:10]


_RLE_WORD_BITS = 8
_RLE_SIZES = (3, 4, 8, 16)  # bits of the run-length field for each of the four size classes
_RLE_MAX_RUN = 2**16
_RLE_HEADER_BITS = 32 + 5 + 4 * 4  # value count, word size - 1, four run-length field sizes - 1


def brush_rle_encode(mask: np.ndarray) -> list[int]:
    """Encode a 2-D boolean (or 0/1, 0/255) mask as Label Studio brush RLE.

    Vectorised with numpy; the output is identical, byte for byte, to label-studio-sdk's
    ``converter.brush.mask2rle(mask * 255)`` (same run splitting, same padding), which is pure Python
    and takes about 0.2 s per megapixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D, got shape {mask.shape}")
    flat = mask.reshape(-1)
    inside = flat if flat.dtype == np.bool_ else flat > 0  # a byte a pixel, no full-size integer arrays
    num = inside.size * 4  # every pixel is repeated for R, G, B and alpha
    # Runs over the RGBA stream: each pixel run of length n is a run of 4n equal bytes.
    if inside.size:
        step = 1 << 23  # where the value changes, found a few megapixels at a time
        change = np.concatenate(
            [np.zeros(0, np.int64)]
            + [
                np.flatnonzero(inside[s + 1 : e + 1] != inside[s:e]) + s
                for s in range(0, inside.size - 1, step)
                for e in [min(s + step, inside.size - 1)]
            ]
        )
        ends = np.append(change, inside.size - 1)
        lengths = np.diff(np.append(-1, ends)) * 4
        values = np.where(inside[ends], 255, 0).astype(np.int64)
    else:
        lengths = values = np.zeros(0, dtype=np.int64)
    # Runs longer than 2**16 are split into full 2**16 chunks and a remainder, all in size class 3.
    chunks = np.where(lengths > 256, (lengths - 1) // _RLE_MAX_RUN, 0)
    run_index = np.repeat(np.arange(lengths.size), chunks + 1)
    last = np.r_[np.diff(run_index) != 0, True] if run_index.size else np.zeros(0, dtype=bool)
    tok_len = np.where(last, lengths[run_index] - chunks[run_index] * _RLE_MAX_RUN, _RLE_MAX_RUN)
    tok_val = values[run_index]
    size_class = np.select([tok_len <= 8, tok_len <= 16, tok_len <= 256], [0, 1, 2], 3)
    field_bits = np.asarray(_RLE_SIZES)[size_class]
    flag = (tok_len > 1).astype(np.int64)  # a single value is written as a literal of one word
    # token = flag | size class (2 bits) | length - 1 | value (8 bits), most significant bit first
    tokens = (
        (((flag << 2 | size_class) << field_bits | (tok_len - 1)) << _RLE_WORD_BITS) | tok_val
    ).astype(np.int64)
    tok_bits = 3 + field_bits + _RLE_WORD_BITS
    width = int(tok_bits.max()) if tokens.size else 1
    shifts = tok_bits[:, None] - 1 - np.arange(width)[None, :]
    bits = (tokens[:, None] >> np.maximum(shifts, 0)) & 1
    body = bits[shifts >= 0]
    header_value = (num << 5 | (_RLE_WORD_BITS - 1)) << 16
    for i, size in enumerate(_RLE_SIZES):
        header_value |= (size - 1) << (12 - 4 * i)
    header = (header_value >> np.arange(52, -1, -1)) & 1
    stream = np.concatenate([header, body]).astype(np.uint8)
    stream = np.concatenate([stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)])
    return np.packbits(stream).astype(int).tolist()


#: Status codes of :func:`_brush_alpha` (0 is success).
_RLE_ERRORS = {
    1: "brush RLE ends in the middle of a run",
    2: "a literal run goes past the end of the pixels",
    3: "a run value does not fit in a byte",
}


@compiled
def _brush_alpha(
    data: np.ndarray, num: int, word_size: int, sizes: np.ndarray, out: np.ndarray, height: int, width: int
) -> int:
    """Decode the runs of Label Studio's RLE (thi.ng rle-pack) that follow its 53-bit header, keeping
    only the alpha channel: ``out`` (zeroed, ``height*width`` bytes, column-major) gets 1 where alpha
    is not 0. ``sizes`` are the bits of the run-length field of the four size classes.

    Returns 0, or a key of ``_RLE_ERRORS``.
    """
    total = data.size * 8
    pos = _RLE_HEADER_BITS
    i = 0
    while i < num:
        if pos + 3 > total:
            return 1
        repeat = (data[pos >> 3] >> (7 - (pos & 7))) & 1
        cls = (((data[(pos + 1) >> 3] >> (7 - ((pos + 1) & 7))) & 1) << 1) | (
            (data[(pos + 2) >> 3] >> (7 - ((pos + 2) & 7))) & 1
        )
        pos += 3
        n = sizes[cls]
        if pos + n > total:
            return 1
        length = 0
        for _ in range(n):
            length = (length << 1) | ((data[pos >> 3] >> (7 - (pos & 7))) & 1)
            pos += 1
        j = i + 1 + length
        if pos + (1 if repeat else j - i) * word_size > total:
            return 1
        if repeat:
            value = 0
            for _ in range(word_size):
                value = (value << 1) | ((data[pos >> 3] >> (7 - (pos & 7))) & 1)
                pos += 1
            if value > 255:
                return 3
            if value:
                # the alpha values (every 4th of the RGBA stream) of pixels i//4 .. stop//4; a run past
                # the end is cut there; pixels are written row segment by row segment
                p = i >> 2
                stop = min(j, num) >> 2
                row = p // width
                col = p - row * width
                while p < stop:
                    seg = min(stop - p, width - col)
                    for c in range(col, col + seg):
                        out[c * height + row] = 1
                    p += seg
                    row += 1
                    col = 0
        else:
            if j > num:
                return 2
            for k in range(i, j):
                value = 0
                for _ in range(word_size):
                    value = (value << 1) | ((data[pos >> 3] >> (7 - (pos & 7))) & 1)
                    pos += 1
                if value > 255:
                    return 3
                if value and (k & 3) == 3:
                    p = k >> 2
                    out[(p % width) * height + p // width] = 1
        i = j
    return 0


def brush_rle_decode(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE into a boolean ``(height, width)`` mask (column-major in memory,
    ready for COCO RLE encoding without a copy).

    Only the alpha channel is kept (what Label Studio draws); a compiled decoder reads the bits and
    writes the mask directly, about 20x faster than expanding the whole RGBA stream in Python (which is
    what happens where numba is not installed).
    Raises :class:`UserError` when the RLE is corrupt or does not hold ``height*width`` RGBA pixels.
    """
    try:
        items = rle.tolist() if isinstance(rle, np.ndarray) else rle if isinstance(rle, list) else list(rle)
        data = np.frombuffer(bytes(items), dtype=np.uint8)  # bytes() checks every value is 0..255
    except (TypeError, ValueError) as exc:
        raise UserError(f"brush RLE cannot be decoded: it must be a list of byte values: {exc}") from exc
    if data.size * 8 < _RLE_HEADER_BITS:
        raise UserError("brush RLE cannot be decoded: it ends in the middle of its header")
    header = int.from_bytes(data[:7].tobytes(), "big") >> 3
    num = header >> 21
    word_size = (header >> 16 & 31) + 1
    sizes = np.array([(header >> shift & 15) + 1 for shift in (12, 8, 4, 0)], dtype=np.int64)
    if num > (data.size * 8 // 3 + 1) * _RLE_MAX_RUN:  # a run holds at most 2**16 values, >= 3 bits
        raise UserError(f"brush RLE cannot be decoded: it claims {num} values, more than its length allows")
    if num != height * width * 4:
        raise UserError(
            f"brush RLE holds {num // 4} pixels but the image is {width}x{height} ({height * width})"
        )
    if not numba_available():
        return _brush_alpha_sdk(bytes(items), height, width)
    out = np.zeros(height * width, np.uint8)
    status = _brush_alpha(data, num, word_size, sizes, out, height, width)
    if status:
        raise UserError(f"brush RLE cannot be decoded: {_RLE_ERRORS[status]}")
    return out.view(np.bool_).reshape((height, width), order="F")


def _brush_alpha_sdk(rle: bytes, height: int, width: int) -> np.ndarray:
    """:func:`brush_rle_decode`'s mask from label-studio-sdk's pure-Python decoder (a base dependency), for an
    install without numba (the backend's): the same mask, some tens of times slower."""
    from label_studio_sdk.converter.brush import decode_rle

    try:
        rgba = decode_rle(rle)
    except (ValueError, OverflowError, IndexError) as exc:
        raise UserError(f"brush RLE cannot be decoded: {exc}") from exc
    return np.asfortranarray(rgba[3::4].reshape(height, width) != 0)


def percent_to_pixels(points: Any, width: int, height: int) -> np.ndarray:
    """``[[x%, y%], ...]`` to a float ``(N, 2)`` array of pixel coordinates."""
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return arr * np.array([width / 100.0, height / 100.0])


def rectangle_corners(value: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """A Label Studio rectangle's four corners in pixels, ``(4, 2)``, starting at its top-left ``(x, y)``:
    the box is rotated by ``rotation`` degrees (clockwise on screen) around that corner.

    Raises ``KeyError``, ``TypeError`` or ``ValueError`` for a value without numeric coordinates."""
    x = float(value["x"]) * width / 100.0
    y = float(value["y"]) * height / 100.0
    w = float(value["width"]) * width / 100.0
    h = float(value["height"]) * height / 100.0
    theta = math.radians(float(value.get("rotation") or 0.0))
    c, s = math.cos(theta), math.sin(theta)
    return np.array(
        [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    )


def pixels_to_percent(points: Any, width: int, height: int) -> list[list[float]]:
    """A ``(N, 2)`` array of pixel coordinates to ``[[x%, y%], ...]``, clipped to 0..100."""
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pct = np.clip(arr * np.array([100.0 / width, 100.0 / height]), 0.0, 100.0)
    return [[round(x, 4), round(y, 4)] for x, y in pct.tolist()]


def make_result(
    *,
    from_name: str,
    to_name: str,
    result_type: str,
    value: dict[str, Any],
    width: int,
    height: int,
    score: float | None = None,
) -> dict[str, Any]:
    """One Label Studio result dict (a region) in the shape predictions and exports use."""
    result: dict[str, Any] = {
        "id": new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
    }
    if score is not None:
        result["score"] = round(float(score), 4)
    return result


# -- what annotators type and click ------------------------------------------------------------------

#: Context region types that make a request interactive (a typed text prompt, a click or a box).
INTERACTIVE_TYPES = ("textarea", "keypointlabels", "rectanglelabels")


def text_entries(value: Any) -> list[str]:
    """A TextArea value's text as a list of entries: each item of ``value["text"]`` (a list, or one
    string), split into lines, stripped, empty lines dropped. The one reader of TextArea text."""
    raw = value.get("text") if isinstance(value, dict) else None
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.extend(line.strip() for line in item.splitlines() if line.strip())
    return out


def textarea_text(value: Any) -> str | None:
    """A TextArea value's text as one expression (its entries joined by spaces), or None when empty."""
    return " ".join(text_entries(value)) or None


def results_text(results: Any) -> str | None:
    """The text of the first TextArea result with any text in a list of results, or None."""
    for region in results or []:
        if isinstance(region, dict) and region.get("type") == "textarea":
            text = textarea_text(region.get("value") or {})
            if text:
                return text
    return None


def context_regions(context: Any) -> list[dict[str, Any]]:
    """The regions of an interactive request's ``context`` (``{"result": [...]}``); [] without one."""
    if not isinstance(context, dict):
        return []
    return [r for r in (context.get("result") or []) if isinstance(r, dict)]


def is_interactive(context: Any) -> bool:
    """Whether a request's context holds a typed text, a click or a box."""
    return any(r.get("type") in INTERACTIVE_TYPES for r in context_regions(context))


def context_text(context: Any) -> str | None:
    """The text typed in an interactive request's TextArea, or None."""
    return results_text(context_regions(context))


def context_text_controls(context: Any) -> set[str]:
    """The ``from_name`` of every TextArea region in the context (they get no regions of their own)."""
    return {str(r.get("from_name")) for r in context_regions(context) if r.get("type") == "textarea"}


@dataclass(frozen=True)
class Click:
    """One interactive key point or box with a label, in Label Studio's percent coordinates."""

    kind: str  # "keypointlabels" or "rectanglelabels"
    label: str
    from_name: str | None
    x: float
    y: float
    width: float = 0.0
    height: float = 0.0
    positive: bool = True

    def pixel_point(self, width: int, height: int) -> tuple[int, int]:
        """The clicked pixel ``(column, row)``, clamped to the image."""
        ((px, py),) = percent_to_pixels([[self.x, self.y]], width, height)
        return min(max(int(px), 0), width - 1), min(max(int(py), 0), height - 1)

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box's pixels ``(x0, y0, x1, y1)``, end-exclusive, at least one pixel, clamped to the image."""
        x0, y0 = self.pixel_point(width, height)
        ((ex, ey),) = percent_to_pixels([[self.x + self.width, self.y + self.height]], width, height)
        x1 = min(max(int(np.ceil(ex)), x0 + 1), width)
        y1 = min(max(int(np.ceil(ey)), y0 + 1), height)
        return x0, y0, x1, y1


def _coordinate(kind: str, value: dict[str, Any], key: str) -> float:
    raw = value.get(key, 0.0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not np.isfinite(raw):
        raise UserError(f"the context's {kind} region has a {key} that is not a finite number")
    return float(raw)


def context_clicks(context: Any) -> list[Click]:
    """The labelled key points and boxes of an interactive request's context, in order.

    Raises :class:`~groundlabel.errors.UserError` for a malformed one (a coordinate that is not a number,
    labels that are not a list of strings).
    """
    out: list[Click] = []
    for region in context_regions(context):
        kind = region.get("type")
        if kind not in ("keypointlabels", "rectanglelabels"):
            continue
        value = region.get("value") or {}
        if not isinstance(value, dict):
            raise UserError(f"the context's {kind} region has a value that is not an object")
        labels = value.get(kind) or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise UserError(f"the context's {kind} region's {kind} is not a list of label names")
        if not labels:
            continue
        out.append(
            Click(
                kind=str(kind),
                label=labels[0],
                from_name=region.get("from_name"),
                x=_coordinate(kind, value, "x"),
                y=_coordinate(kind, value, "y"),
                width=_coordinate(kind, value, "width"),
                height=_coordinate(kind, value, "height"),
                positive=region.get("is_positive", True) is not False,
            )
        )
    return out
