import io

import numpy as np
import pytest
from PIL import Image

from datapipe.common.validate import ImageRules, Rejected, clean_image
from tests.conftest import jpeg_bytes


def decode(data):
    return Image.open(io.BytesIO(data))


def reason_of(data, rules=ImageRules()):
    with pytest.raises(Rejected) as caught:
        clean_image(data, rules)
    return caught.value.reason


def test_plain_rgb_jpeg_is_stored_byte_for_byte():
    data = jpeg_bytes()
    cleaned = clean_image(data)
    assert cleaned.jpeg == data and cleaned.converted == "" and (cleaned.width_px, cleaned.height_px) == (96, 80)


@pytest.mark.parametrize("data, reason", [
    (jpeg_bytes()[:300], "undecodable"),
    (b"<html>not an image</html>", "undecodable"),
    (b"", "missing_image"),
    (jpeg_bytes(40, 200), "too_small"),
    (jpeg_bytes(400, 80), "aspect_ratio"),
])
def test_rejections(data, reason):
    assert reason_of(data) == reason


def test_pixel_limit_rejects_before_decoding():
    assert reason_of(jpeg_bytes(300, 300), ImageRules(max_pixels=200 * 200)) == "too_large"


def test_thresholds_are_options():
    clean_image(jpeg_bytes(40, 40), ImageRules(min_side_px=32))
    clean_image(jpeg_bytes(400, 80), ImageRules(max_aspect_ratio=6.0))


@pytest.mark.parametrize("mode, fmt, change", [
    ("CMYK", "JPEG", "CMYK->RGB"), ("L", "JPEG", "L->RGB"), ("P", "PNG", "PNG->JPEG"), ("RGBA", "PNG", "RGBA->RGB"),
])
def test_other_modes_become_rgb_jpeg(mode, fmt, change):
    cleaned = clean_image(jpeg_bytes(mode=mode, fmt=fmt))
    image = decode(cleaned.jpeg)
    assert image.format == "JPEG" and image.mode == "RGB" and change in cleaned.converted


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))  # fully transparent red
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    pixels = np.asarray(decode(clean_image(buffer.getvalue()).jpeg))
    assert pixels.min() > 245  # white, not red or black


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    cleaned = clean_image(jpeg_bytes(120, 90, exif=exif.tobytes()))
    assert (cleaned.width_px, cleaned.height_px) == (90, 120)
    assert decode(cleaned.jpeg).size == (90, 120) and "orientation 6" in cleaned.converted


def test_pixel_digest_identifies_identical_pixels_only():
    assert clean_image(jpeg_bytes()).pixel_digest == clean_image(jpeg_bytes()).pixel_digest
    assert clean_image(jpeg_bytes()).pixel_digest != clean_image(jpeg_bytes(color=(0, 0, 200))).pixel_digest


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sixteen_bit_rgb_png(rgb16):
    import cv2  # Pillow cannot write 16-bit RGB; img2dataset brings OpenCV

    return cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes()  # OpenCV writes BGR


GREY_16 = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
RGB_16 = np.stack([GREY_16, GREY_16[::-1], np.full_like(GREY_16, 20000)], axis=-1)


@pytest.mark.parametrize("name, data, expected", [
    ("16-bit grey PNG (I;16)", encoded(Image.fromarray(GREY_16), "PNG"), np.rint(GREY_16 / 257)),
    ("16-bit grey TIFF", encoded(Image.fromarray(GREY_16), "TIFF"), np.rint(GREY_16 / 257)),
    ("32-bit integer TIFF (I)", encoded(Image.fromarray(GREY_16.astype(np.int32)), "TIFF"), np.rint(GREY_16 / 257)),
    ("float TIFF (F) in 0-1", encoded(Image.fromarray((GREY_16 / 65535).astype(np.float32)), "TIFF"),
     np.rint(GREY_16 / 257)),
    ("16-bit RGB PNG", sixteen_bit_rgb_png(RGB_16), np.rint(RGB_16 / 257)),
    ("1-bit PNG", encoded(Image.fromarray(GREY_16 > 30000), "PNG"), (GREY_16 > 30000) * 255.0),
    ("palette PNG", encoded(Image.fromarray((GREY_16 // 257).astype(np.uint8)).convert("P"), "PNG"),
     np.rint(GREY_16 / 257)),
])
def test_every_mode_becomes_the_right_8_bit_rgb_pixels(name, data, expected):
    """Against the source pixels: 16-bit, float and palette images keep their tones (JPEG-close)."""
    pixels = np.asarray(decode(clean_image(data, ImageRules(min_side_px=32)).jpeg), dtype=np.float64)
    expected = np.repeat(expected[..., None], 3, axis=-1) if expected.ndim == 2 else expected
    assert np.abs(pixels - expected).mean() < 3, name


@pytest.mark.parametrize("values", [np.full((80, 96), 2.5, np.float32), np.full((80, 96), -70000, np.int32)])
def test_pixels_whose_range_is_unknown_are_rejected(values):
    assert reason_of(encoded(Image.fromarray(values), "TIFF")) == "unsupported_mode"
