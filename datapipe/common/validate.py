"""Decode one downloaded image, normalize it to an RGB JPEG, or say why it must be rejected."""

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from datapipe.common import near_duplicates

# decode_rgb applies its own pixel limit (ImageRules.max_pixels) from the header, before decoding; Pillow's warning
# for large images would only repeat it. Set once here: changing the filters per image resets Python's show-once
# record, so every other warning would print again for each image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

JPEG_QUALITY = 95


@dataclass(frozen=True)
class ImageRules:
    """Thresholds for `make shards`; every one is a command-line option."""

    min_side_px: int = 64  # smaller images cannot give a 96-px local crop without upsampling 1.5x
    max_aspect_ratio: float = 4.0  # wider panoramas lose most of their content to square crops
    max_pixels: int = 8192 * 8192  # decompression-bomb limit: refuse before decoding
    # A raw tar member declaring more bytes is rejected from its header, never read: far above any web image.
    max_member_bytes: int = 64 << 20

    def __post_init__(self):
        if self.min_side_px < 1 or self.max_pixels < 1 or not self.max_aspect_ratio >= 1:
            raise ValueError(f"--min-side-px and --max-pixels must be at least 1 and --max-aspect-ratio at least 1.0 "
                             f"(got {self.min_side_px}, {self.max_pixels} and {self.max_aspect_ratio})")
        if self.max_member_bytes < 1:
            raise ValueError(f"--max-member-bytes must be at least 1 (got {self.max_member_bytes})")


class Rejected(Exception):
    """A sample that does not go into the training shards; `reason` is a short stable code."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes
    width_px: int
    height_px: int
    pixel_digest: str  # sha256 of the decoded RGB pixels, for exact-duplicate detection
    signature: tuple | None  # (64-bit pHash, details) for near duplicates (datapipe.common.near_duplicates)
    converted: str  # what was done to it: "" (stored as downloaded), or e.g. "CMYK->RGB"


def scale_to_8_bit(values, kind):
    """uint8 pixels from deeper ones (any shape; `kind` names them in the error). Clipping at 255, as Pillow and
    OpenCV do, turns a 16-bit photo near-white. Scales: integers within 0-65535 by 1/257, floats within 0-1
    by 255; other ranges cannot be read without knowing what they mean: rejected."""
    top, scale = (1.0, 255.0) if np.issubdtype(values.dtype, np.floating) else (65535, 1 / 257)
    values = np.asarray(values, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > top):
        raise Rejected("unsupported_mode", f"{kind} pixels from {values.min():g} to {values.max():g}: "
                                           f"only 0-{top:g} can be converted to 8 bits")
    return np.rint(values * scale).astype(np.uint8)


def _to_8_bit(image):
    """Images of more than 8 bits per pixel (Pillow's I;16, I and F modes) as 8-bit grey ('L')."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray(scale_to_8_bit(np.asarray(image, dtype=np.int64), image.mode), "L")
    if image.mode == "F":
        return Image.fromarray(scale_to_8_bit(np.asarray(image, dtype=np.float64), image.mode), "L")
    return image


def _to_rgb(image):
    """RGB pixels; transparency is composited over white, as img2dataset does."""
    image = _to_8_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(data, max_pixels=ImageRules.max_pixels):
    """(RGB image with EXIF orientation applied, source format, source mode, EXIF orientation) or raises Rejected."""
    if not data:
        raise Rejected("missing_image", "the sample has no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        width_px, height_px = image.size
        if width_px * height_px > max_pixels:
            raise Rejected("too_large", f"{width_px}x{height_px} exceeds {max_pixels} pixels")
        image.load()
    except Rejected:
        raise
    except Exception as error:  # noqa: BLE001 (Pillow raises many types for broken files)
        raise Rejected("undecodable", f"{type(error).__name__}: {error}") from None
    source_format, source_mode = image.format, image.mode
    orientation = image.getexif().get(0x0112, 1)
    try:
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    except (ValueError, OSError) as error:  # a mode Pillow opens but cannot convert
        raise Rejected("unsupported_mode", f"{source_mode}: {error}") from None
    return rgb, source_format, source_mode, orientation


def clean_image(data, rules=ImageRules(), hashing=True):
    """Returns a CleanImage (with its near-duplicate signature if `hashing`, else None) or raises Rejected."""
    rgb, source_format, source_mode, orientation = decode_rgb(data, rules.max_pixels)
    width_px, height_px = rgb.size
    if min(width_px, height_px) < rules.min_side_px:
        raise Rejected("too_small", f"{width_px}x{height_px}, shorter side below {rules.min_side_px} px")
    aspect = max(width_px, height_px) / min(width_px, height_px)
    if aspect > rules.max_aspect_ratio:
        raise Rejected("aspect_ratio", f"{width_px}x{height_px} has aspect {aspect:.1f} > {rules.max_aspect_ratio}")
    digest = hashlib.sha256(f"{width_px}x{height_px}:".encode() + rgb.tobytes()).hexdigest()
    signature = near_duplicates.signature(rgb) if hashing else None
    changes = []
    if source_format != "JPEG":
        changes.append(f"{source_format}->JPEG")
    if source_mode != "RGB":
        changes.append(f"{source_mode}->RGB")
    if orientation != 1:
        changes.append(f"EXIF orientation {orientation} applied")
    if not changes:
        return CleanImage(data, width_px, height_px, digest, signature, "")
    encoded = io.BytesIO()
    rgb.save(encoded, format="JPEG", quality=JPEG_QUALITY)
    return CleanImage(encoded.getvalue(), width_px, height_px, digest, signature, ", ".join(changes))
