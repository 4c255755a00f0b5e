"""decode_image: RGB output, EXIF orientation, and clear refusals of bad or oversized input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.settings import Settings
from workers.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height RGB pixels, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_defaults_are_the_documented_ones() -> None:
    assert DEFAULT_MAX_BYTES == 50 * 1024 * 1024
    assert DEFAULT_MAX_PIXELS == 100_000_000
    assert issubclass(ImageError, UserError)


def test_rgb_png_bytes_and_file_path(tmp_path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr))
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (30, 20)
    assert np.array_equal(np.asarray(im), arr)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(decode_image(path)), arr)
    assert np.array_equal(np.asarray(decode_image(str(path))), arr)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
    ],
)
def test_modes_become_rgb(mode: str, fmt: str) -> None:
    im = Image.new("RGB", (16, 12), (200, 100, 50)).convert(mode)
    out = decode_image(encode(im, fmt))
    assert out.mode == "RGB" and out.size == (16, 12)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    out = np.asarray(decode_image(encode(im)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_composited_over_white() -> None:
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (255, 0, 0, 255))
    out = np.asarray(decode_image(encode(im)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the left strip is now on top


def test_zero_bytes_and_not_an_image(tmp_path) -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, this is text and not a picture")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg.*empty"):
        decode_image(empty)
    with pytest.raises(ImageError, match="no such file"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        decode_image(tmp_path)
    with pytest.raises(ImageError, match="URL"):
        decode_image("https://example.com/a.png")


def test_truncated_image() -> None:
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = encode(Image.fromarray(arr), fmt)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            decode_image(data[: len(data) // 2])


def test_huge_dimensions_refused_from_the_header() -> None:
    data = png_header_only(30000, 30000)
    assert len(data) < 200
    # beyond Pillow's own limit (2 x MAX_IMAGE_PIXELS), Pillow refuses it while reading the header
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data)
    # between our limit and Pillow's, ours refuses it, also from the header alone
    with pytest.raises(
        ImageError, match=r"12000x10000 = 120,000,000 pixels, more than the limit of 100,000,000"
    ):
        decode_image(png_header_only(12000, 10000))


def test_limits_from_arguments_and_environment() -> None:
    data = encode(Image.new("RGB", (50, 40)))
    with pytest.raises(ImageError, match="2,000 pixels, more than the limit of 1,999"):
        decode_image(data, max_pixels=1999)
    with pytest.raises(ImageError, match="more than the limit"):
        decode_image(data, max_bytes=len(data) - 1)
    # The environment's limits reach decode_image through the settings' fetch section.
    fetch = Settings.from_env({"GROUNDLABEL_MAX_IMAGE_PIXELS": "1000"}).fetch
    with pytest.raises(ImageError, match="limit of 1,000 pixels"):
        decode_image(data, max_pixels=fetch.max_pixels)
    assert decode_image(data, max_pixels=5000).size == (50, 40)
    with pytest.raises(UserError, match="GROUNDLABEL_MAX_IMAGE_PIXELS"):
        Settings.from_env({"GROUNDLABEL_MAX_IMAGE_PIXELS": "lots"})
    fetch = Settings.from_env({"GROUNDLABEL_MAX_IMAGE_BYTES": "10"}).fetch
    with pytest.raises(ImageError, match="more than the limit"):
        decode_image(data, max_bytes=fetch.max_bytes)


def test_file_size_checked_before_reading(tmp_path) -> None:
    path = tmp_path / "big.png"
    with open(path, "wb") as fh:
        fh.truncate(2048)  # sparse: never read
    with pytest.raises(ImageError, match=r"big\.png: the file is"):
        decode_image(path, max_bytes=1024)


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50
