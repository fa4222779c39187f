"""img2dataset's resizer, with pixels of more than 8 bits scaled to 8 bits before it encodes them.

img2dataset decodes with OpenCV, which keeps 16-bit PNG and TIFF pixels as 16-bit, and its JPEG encoder
then clips every value above 255: a 16-bit photo becomes near-white. This resizer scales such pixels to
8 bits the way `make shards` does (datapipe.validate.scale_to_8_bit), hands img2dataset a lossless 8-bit
PNG of them, and lets it resize and encode as usual. Every other image goes through untouched.

img2dataset builds its Resizer inside `img2dataset.download`; `in_img2dataset()` has it build this one
for the duration of a download. The instance is pickled into img2dataset's workers (multiprocessing or
Spark), which import this module by name.
"""

import importlib
from contextlib import contextmanager
from io import BytesIO

import cv2
import numpy as np
from img2dataset.resizer import Resizer

from datapipe.validate import Rejected, scale_to_8_bit

# The module: the package's `main` attribute is img2dataset's command-line function of that name.
img2dataset_main = importlib.import_module("img2dataset.main")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH_AT = 24  # the IHDR chunk's bit depth byte


def may_have_deep_pixels(data):
    """False for files that hold at most 8 bits per channel, told by their first bytes: JPEG (12-bit JPEGs
    are too rare on the web to decode every JPEG twice), GIF, WebP, and PNG of 8 bits or less."""
    if data[:2] == b"\xff\xd8" or data[:4] in (b"GIF8", b"RIFF"):
        return False
    if data[:8] == PNG_SIGNATURE:
        return len(data) > PNG_BIT_DEPTH_AT and data[PNG_BIT_DEPTH_AT] > 8
    return True


class EightBitResizer(Resizer):
    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        if self.disable_all_reencoding or not may_have_deep_pixels(data):
            return super().__call__(img_stream, blurring_bbox_list)
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # (H, W[, C]) as stored
        if pixels is None or pixels.dtype == np.uint8:
            return super().__call__(img_stream, blurring_bbox_list)
        try:
            pixels = scale_to_8_bit(pixels, f"{pixels.dtype} ({pixels.shape[-1] if pixels.ndim == 3 else 1} channels)")
        except Rejected as rejected:
            return None, None, None, None, None, str(rejected)
        lossless = cv2.imencode(".png", pixels)[1].tobytes()
        return super().__call__(BytesIO(lossless), blurring_bbox_list)


@contextmanager
def in_img2dataset():
    """Within this block, `img2dataset.download` resizes with EightBitResizer."""
    original = img2dataset_main.Resizer
    img2dataset_main.Resizer = EightBitResizer
    try:
        yield
    finally:
        img2dataset_main.Resizer = original
