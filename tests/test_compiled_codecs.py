"""The compiled codecs of the export path against plain references: Label Studio brush RLE decoding
(a plain Python decoder of the whole RGBA stream, the one groundlabel used before), COCO RLE encoding
(pycocotools' ``encode``) and the polygon checks of ``polygon_from_percent``."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from pycocotools import mask as mask_utils

from exporters.geometry import GeometryError, polygon_from_percent, rle_from_mask
from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_decode, brush_rle_encode


def reference_decode(rle: list[int]) -> np.ndarray:
    """Label Studio RLE (thi.ng rle-pack) to the flat RGBA byte stream, bit by bit in plain Python."""
    bits = "".join(f"{int(v):08b}" for v in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("ends in the middle of a run")
        value = int(bits[pos : pos + n], 2)
        pos += n
        return value

    num = read(32)
    word_size = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word_size)
            i = j
        else:
            while i < j:
                out[i] = read(word_size)
                i += 1
    return out


def reference_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    return reference_decode(rle).reshape(height, width, 4)[:, :, 3] > 0


def pack(stream: np.ndarray, rng: np.random.Generator, sizes: tuple[int, ...] = (3, 4, 8, 16)) -> list[int]:
    """Encode a byte stream as thi.ng RLE with random token choices: repeat runs of any length the size
    classes allow, and literal runs of several values (which label-studio-sdk's encoder never writes)."""
    out = [f"{stream.size:032b}", f"{7:05b}", "".join(f"{s - 1:04b}" for s in sizes)]
    i = 0
    while i < stream.size:
        cls = int(rng.integers(0, 4))
        most = min(2 ** sizes[cls], stream.size - i)
        n = int(rng.integers(1, most + 1))
        same = np.all(stream[i : i + n] == stream[i])
        if same and rng.random() < 0.7:
            out.append(f"1{cls:02b}{n - 1:0{sizes[cls]}b}{int(stream[i]):08b}")
        else:
            values = "".join(f"{int(v):08b}" for v in stream[i : i + n])
            out.append(f"0{cls:02b}{n - 1:0{sizes[cls]}b}{values}")
        i += n
    bits = "".join(out)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


def random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    masks = [np.zeros((1, 1), bool), np.ones((1, 1), bool), np.ones((3, 257), bool)]
    masks.append(np.zeros((480, 640), bool))
    long_run = np.zeros((300, 700), bool)
    long_run[10:290] = True  # runs longer than 2**16 RGBA bytes
    masks.append(long_run)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        kind = rng.integers(0, 3)
        if kind == 0:
            masks.append(rng.random((h, w)) < rng.random())
        elif kind == 1:
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w))
            masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
        else:
            m = np.zeros((h, w), bool)
            m[:, int(rng.integers(0, w))] = True  # one column: a run per row
            masks.append(m)
    return masks


@pytest.mark.parametrize("mask", random_masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_brush_decode_matches_the_reference_and_the_sdk_encoder(mask: np.ndarray) -> None:
    rle = brush_rle_encode(mask)
    decoded = brush_rle_decode(rle, *mask.shape)
    assert decoded.dtype == bool and decoded.flags.f_contiguous
    assert np.array_equal(decoded, reference_mask(rle, *mask.shape))
    assert np.array_equal(decoded, mask)
    sdk = [int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)]
    assert np.array_equal(brush_rle_decode(sdk, *mask.shape), mask)


@pytest.mark.parametrize("seed", range(12))
def test_brush_decode_of_literal_runs_and_partial_alpha(seed: int) -> None:
    """RGBA streams whose colour and alpha differ, coded with literal runs: only alpha > 0 counts."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (h, w, 3))  # colour where alpha is 0 must not count
    alpha = rng.random((h, w)) < rng.random()
    rgba[..., 3] = np.where(alpha, rng.integers(1, 256, (h, w)), 0)
    if seed % 3 == 0:
        rgba[: h // 2] = 0  # long runs of zeros too
    alpha = rgba[..., 3] > 0
    rle = pack(rgba.reshape(-1), rng, sizes=((3, 4, 8, 16), (1, 2, 5, 9), (2, 6, 10, 12))[seed % 3])
    assert np.array_equal(reference_decode(rle), rgba.reshape(-1))  # the test's packer is right
    decoded = brush_rle_decode(rle, h, w)
    assert np.array_equal(decoded, reference_mask(rle, h, w))
    assert np.array_equal(decoded, alpha)


def test_brush_decode_rejects_what_the_reference_rejects() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((20, 30)) < 0.4
    rle = brush_rle_encode(mask)
    for cut in (7, len(rle) // 2, len(rle) - 2):
        with pytest.raises(ValueError):
            reference_decode(rle[:cut])
        with pytest.raises(UserError, match="cannot be decoded"):
            brush_rle_decode(rle[:cut], 20, 30)
    with pytest.raises(UserError, match="holds 600 pixels"):
        brush_rle_decode(rle, 30, 30)
    for junk in ([1, 2, 3], [0, 0, 0, 1, 0, 0, 0, 300], ["a"] * 8, [0.5] * 8, 5):
        with pytest.raises(UserError, match="cannot be decoded"):
            brush_rle_decode(junk, 4, 4)  # type: ignore[arg-type]
    # a literal run that goes past the pixel count
    stream = np.zeros(16, np.uint8)
    bad = pack(stream, np.random.default_rng(0))
    bits = "".join(f"{v:08b}" for v in bad)
    bits = bits[:53] + "0" + "11" + f"{20:016b}" + "0" * 8 * 21
    bits += "0" * (-len(bits) % 8)
    with pytest.raises(UserError, match="past the end"):
        brush_rle_decode([int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)], 2, 2)


@pytest.mark.parametrize("seed", range(6))
def test_coco_rle_is_pycocotools_encode(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 17), (17, 1), (8, 8), (9, 7), (480, 640), (123, 77), (0, 4)]
    for shape in shapes:
        for p in (0.0, 0.002, 0.3, 0.5, 0.97, 1.0):
            mask = rng.random(shape) < p
            ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            for layout in (mask, np.asfortranarray(mask), mask.astype(np.uint8) * 255):
                got = rle_from_mask(layout)
                assert got["counts"] == ref["counts"], (shape, p)
                assert got["size"] == [int(v) for v in ref["size"]]
    with pytest.raises(ValueError, match="2-D"):
        rle_from_mask(np.zeros((2, 2, 2), bool))


def test_polygon_from_percent_checks() -> None:
    assert polygon_from_percent([[0, 0], [50, 0], [50, 50]], 200, 100) == [0.0, 0.0, 100.0, 0.0, 100.0, 50.0]
    for bad, reason in (
        ([[10, 10], [10, 10], [20, 20]], "distinct"),
        ([[10, 10], [10.00000001, 10], [20, 20], [20, 20]], "distinct"),
        ([[0, 0], [10, 10], [20, 20]], "zero area"),
        ([[0, 0], [10, float("nan")], [20, 20]], "finite"),
        ([[0, 0], ["a", 1]], "numbers"),
    ):
        with pytest.raises(GeometryError, match=reason):
            polygon_from_percent(bad, 640, 480)


def test_brush_encode_of_a_large_mask_with_changes_at_the_chunk_edges() -> None:
    """The encoder finds value changes a few megapixels at a time: changes at those edges survive."""
    step = 1 << 23
    mask = np.zeros(4000 * 5000, bool)
    for at in (0, 5, step - 1, step + 1, 2 * step - 2, 2 * step, mask.size - 1):
        mask[at] = True
    mask[step - 1 : step + 3] = True
    mask = mask.reshape(4000, 5000)
    assert np.array_equal(brush_rle_decode(brush_rle_encode(mask), 4000, 5000), mask)
