"""Reading images never resets Python's show-once record of warnings: a warning from elsewhere (a torch deprecation
in the training step) prints once, not at every step of every rank."""

import io
import warnings

import pytest
from PIL import Image

from datapipe.common.validate import decode_rgb
from datapipe.load.samples import UnreadableSample, jpeg_size


def a_deprecated_call():
    warnings.warn("this call is deprecated", UserWarning, stacklevel=1)


def jpeg_bytes():
    stream = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(stream, format="JPEG")
    return stream.getvalue()


@pytest.mark.parametrize("read", [jpeg_size, decode_rgb], ids=["training: jpeg_size", "make shards: decode_rgb"])
def test_a_warning_between_image_reads_is_shown_once(read):
    jpeg = jpeg_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place, as Python shows a UserWarning
        for _ in range(4):
            read(jpeg)
            a_deprecated_call()
    assert [str(warning.message) for warning in caught] == ["this call is deprecated"]


def test_the_header_reader_still_refuses_what_is_not_a_jpeg():
    stream = io.BytesIO()
    Image.new("RGB", (8, 8)).save(stream, format="PNG")
    assert jpeg_size(jpeg_bytes()) == (30, 40)
    with pytest.raises(UnreadableSample, match="jpg header does not parse"):
        jpeg_size(stream.getvalue())
    with pytest.raises(UnreadableSample, match="jpg header does not parse"):
        jpeg_size(jpeg_bytes()[:20])
