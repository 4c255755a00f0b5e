"""Label Studio region format: brush RLE (against label-studio-sdk's encoder) and coordinates."""

import numpy as np
import pytest
from label_studio_sdk.converter import brush

from groundlabel.errors import UserError
from groundlabel.ls_format import (
    brush_rle_decode,
    brush_rle_encode,
    make_result,
    percent_to_pixels,
    pixels_to_percent,
)


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    long_run = np.zeros((600, 500), bool)
    long_run[:400] = True  # a run of 800,000 RGBA bytes: split into 2**16 chunks
    long_run[450, 3:5] = True
    single = np.zeros((9, 11), bool)
    single[4, 5] = True
    return [
        np.zeros((5, 7), bool),
        np.ones((30, 30), bool),
        rng.random((40, 60)) > 0.5,
        rng.random((120, 333)) > 0.97,
        np.ones((1, 1), bool),
        single,
        long_run,
    ]


@pytest.mark.parametrize("mask", _masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_brush_rle_matches_sdk_and_round_trips(mask: np.ndarray) -> None:
    rle = brush_rle_encode(mask)
    assert rle == [int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)]
    assert np.array_equal(brush_rle_decode(rle, *mask.shape), mask)


def test_brush_rle_accepts_0_255_masks() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 255
    assert np.array_equal(brush_rle_decode(brush_rle_encode(mask), 4, 4), mask > 0)


def test_brush_rle_decode_errors() -> None:
    rle = brush_rle_encode(np.ones((4, 4), bool))
    with pytest.raises(UserError, match="holds 16 pixels"):
        brush_rle_decode(rle, 5, 5)
    with pytest.raises(UserError, match="cannot be decoded"):
        brush_rle_decode([1, 2, 3], 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        brush_rle_encode(np.ones((2, 2, 2), bool))


def test_percent_pixels_round_trip_and_clipping() -> None:
    pts = np.array([[0.0, 0.0], [320.0, 240.0], [640.0, 480.0]])
    pct = pixels_to_percent(pts, 640, 480)
    assert pct == [[0.0, 0.0], [50.0, 50.0], [100.0, 100.0]]
    assert np.allclose(percent_to_pixels(pct, 640, 480), pts)
    assert pixels_to_percent([[-5, 700]], 640, 480) == [[0.0, 100.0]]


def test_make_result_shape() -> None:
    r = make_result(
        from_name="poly", to_name="image", result_type="polygonlabels",
        value={"points": [[1, 2]], "polygonlabels": ["cat"]}, width=10, height=20, score=0.123456,
    )
    assert r["original_width"] == 10 and r["original_height"] == 20 and r["score"] == 0.1235
    assert r["type"] == "polygonlabels" and len(r["id"]) == 10
    assert make_result(
        from_name="a", to_name="b", result_type="t", value={}, width=1, height=1
    ).keys() >= {"id", "value"}
