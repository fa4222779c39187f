"""Two of img2dataset's parts, replaced for our downloads: its resizer and its downloader.

The resizer: img2dataset decodes with OpenCV, which keeps 16-bit PNG and TIFF pixels as 16-bit, and its
JPEG encoder then clips every value above 255: a 16-bit photo becomes near-white. EightBitResizer scales
such pixels to 8 bits the way `make shards` does (datapipe.common.validate.scale_to_8_bit), hands img2dataset a
lossless 8-bit PNG of them, and lets it resize and encode as usual. Every other image goes through untouched.

The downloader: img2dataset's `timeout` bounds each read of the socket, so a server that sends a byte every
few seconds holds a download thread for as long as it likes. DeadlineDownloader gives each image (each
try) DEADLINE_TIMEOUTS x `timeout` seconds in all, after which it is a failed download.

img2dataset builds both inside `img2dataset.download`; `in_img2dataset()` has it build ours for the
duration of a download. They are pickled into img2dataset's workers (multiprocessing or Spark), which
import this module by name.
"""

import functools
import http.client
import importlib
import io
import time
import urllib.request
from contextlib import contextmanager

import cv2
import numpy as np
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer

from datapipe.common.validate import Rejected, scale_to_8_bit

# The module: the package's `main` attribute is img2dataset's command-line function of that name.
img2dataset_main = importlib.import_module("img2dataset.main")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH_AT = 24  # the IHDR chunk's bit depth byte
DEADLINE_TIMEOUTS = 3  # an image may take this many times img2dataset's --timeout in all


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
        return super().__call__(io.BytesIO(lossless), blurring_bbox_list)


class _DeadlineReader(io.RawIOBase):
    """A response's socket reads, each given what is left of the image's overall time (or less: the per-read
    timeout), and none after it."""

    def __init__(self, raw, sock, limit_s):
        super().__init__()
        self._raw, self._sock, self._limit_s = raw, sock, limit_s  # raw: the socket's own reader, which holds it open
        self._per_read_s = sock.gettimeout()
        self._deadline = time.monotonic() + limit_s

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise self._late()
        self._sock.settimeout(remaining_s if self._per_read_s is None else min(remaining_s, self._per_read_s))
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise self._late() from None
            raise

    def _late(self):
        return TimeoutError(f"the image took more than {self._limit_s:g} s in all ({DEADLINE_TIMEOUTS} x --timeout)")

    def close(self):
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, limit_s, **keywords):
        super().__init__(sock, **keywords)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, limit_s))


class _DeadlineHandler:
    """urllib's HTTP(S) handler whose connections read responses under an overall deadline."""

    limit_s = None

    def do_open(self, http_class, req, **http_conn_args):  # urllib's name
        def connection(*args, **keywords):
            opened = http_class(*args, **keywords)
            opened.response_class = functools.partial(_DeadlineResponse, limit_s=self.limit_s)
            return opened

        return super().do_open(connection, req, **http_conn_args)


class _DeadlineHTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


def deadline_opener(limit_s):
    """A urllib opener whose responses must arrive within `limit_s` seconds in all."""
    handlers = [handler_class() for handler_class in (_DeadlineHTTPHandler, _DeadlineHTTPSHandler)]
    for handler in handlers:
        handler.limit_s = limit_s
    return urllib.request.build_opener(*handlers)


class DeadlineDownloader(Downloader):
    def __call__(self, row):
        # In the worker process: img2dataset fetches with urllib.request.urlopen, which uses the installed opener.
        urllib.request.install_opener(deadline_opener(DEADLINE_TIMEOUTS * self.timeout))
        return super().__call__(row)


@contextmanager
def in_img2dataset():
    """Within this block, `img2dataset.download` resizes with EightBitResizer and downloads with
    DeadlineDownloader."""
    originals = img2dataset_main.Resizer, img2dataset_main.Downloader
    img2dataset_main.Resizer, img2dataset_main.Downloader = EightBitResizer, DeadlineDownloader
    try:
        yield
    finally:
        img2dataset_main.Resizer, img2dataset_main.Downloader = originals
