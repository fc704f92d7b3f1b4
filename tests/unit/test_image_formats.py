"""Every image format users have (torchvision's ImageFolder list plus GIF) is accepted by the catalog and decodes to RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import catalog
from pipeline.data import EvalPreset, decode_image

_RNG = np.random.default_rng(0)
_BASE = Image.fromarray(_RNG.integers(0, 255, (30, 40, 3), dtype=np.uint8))


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _animated_gif() -> bytes:
    second = Image.new("RGB", _BASE.size, (255, 0, 0)).convert("P")
    return _save(_BASE.convert("P"), "GIF", save_all=True, append_images=[second])


def _animated_webp() -> bytes:
    second = Image.new("RGB", _BASE.size, (255, 0, 0))
    return _save(_BASE, "WEBP", lossless=True, save_all=True, append_images=[second])


def _sixteen_bit(fmt: str) -> bytes:
    return _save(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)), fmt)


CASES = [
    pytest.param(lambda: _save(_BASE, "JPEG"), "JPEG", id="jpeg"),
    pytest.param(lambda: _save(_BASE.convert("L"), "JPEG"), "JPEG", id="jpeg-grayscale"),
    pytest.param(lambda: _save(_BASE.convert("CMYK"), "JPEG"), "JPEG", id="jpeg-cmyk"),
    pytest.param(lambda: _save(_BASE, "PNG"), "PNG", id="png"),
    pytest.param(lambda: _save(_BASE.convert("RGBA"), "PNG"), "PNG", id="png-alpha"),
    pytest.param(lambda: _save(_BASE.convert("P"), "PNG"), "PNG", id="png-palette"),
    pytest.param(lambda: _save(_BASE.convert("LA"), "PNG"), "PNG", id="png-gray-alpha"),
    pytest.param(lambda: _sixteen_bit("PNG"), "PNG", id="png-16-bit"),
    pytest.param(lambda: _save(_BASE, "WEBP", lossless=True), "WEBP", id="webp"),
    pytest.param(_animated_webp, "WEBP", id="webp-animated-first-frame"),
    pytest.param(lambda: _save(_BASE, "BMP"), "BMP", id="bmp"),
    pytest.param(lambda: _save(_BASE.convert("P"), "GIF"), "GIF", id="gif"),
    pytest.param(_animated_gif, "GIF", id="gif-animated-first-frame"),
    pytest.param(lambda: _save(_BASE, "TIFF"), "TIFF", id="tiff"),
    pytest.param(lambda: _save(_BASE.convert("CMYK"), "TIFF"), "TIFF", id="tiff-cmyk"),
    pytest.param(lambda: _sixteen_bit("TIFF"), "TIFF", id="tiff-16-bit"),
    pytest.param(lambda: _save(_BASE, "PPM"), "PPM", id="ppm"),
    pytest.param(lambda: _save(_BASE.convert("L"), "PPM"), "PPM", id="pgm"),
    pytest.param(lambda: _save(_BASE.convert("1"), "PPM"), "PPM", id="pbm"),
]


def _pillow_rgb(data: bytes) -> np.ndarray:
    """What Pillow makes of the first frame, in 8-bit RGB (16-bit data scaled, not clipped)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8))
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.mark.parametrize(("make", "fmt"), CASES)
def test_format_is_catalogued_and_decodes_to_the_same_rgb_pixels(make, fmt):
    data = make()
    inspection = catalog.inspect_image(data, size=len(data), complete=True)
    assert (inspection.status, inspection.format) == ("ok", fmt)
    assert (inspection.width, inspection.height) == (40, 30)

    image = decode_image(data)
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - _pillow_rgb(data))
    assert diff.max() <= 1  # torchvision's and Pillow's decoders, bit for bit or a rounding
    assert EvalPreset(16).from_bytes(data).shape == (3, 16, 16)


def test_sixteen_bit_images_keep_their_range():
    for fmt in ("PNG", "TIFF"):
        image = decode_image(_sixteen_bit(fmt))
        assert image.dtype == torch.uint8
        assert int(image.max()) in (233, 234)  # 59,950 / 257: scaled, not clipped at 255
        assert int(image.min()) == 0


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: _save(_BASE, "ICO"), id="ico"),
        pytest.param(lambda: b"\0\0\0\x18ftypheic" + b"\0" * 40, id="heic"),
        pytest.param(lambda: b"\0\0\0\x1cftypavif" + b"\0" * 40, id="avif"),
    ],
)
def test_formats_outside_the_list_are_rejected_as_unsupported(data):
    payload = data()
    inspection = catalog.inspect_image(payload, size=len(payload), complete=True)
    assert (inspection.status, inspection.reject_reason) == ("rejected", catalog.REJECT_UNSUPPORTED)
