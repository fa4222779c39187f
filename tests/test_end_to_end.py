"""The whole data path on the demo set: generate, serve, img2dataset, make shards, read back."""

import io
import json
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from PIL import Image

from datapipe import shards
from datapipe.common import manifest, shard_io


def outcome_by_path(train_dir):
    """url path -> 'kept' / 'download_failed' / 'rejected:<reason>', and the kept samples by path."""
    outcomes, kept = {}, {}
    for rejection in manifest.read_rejected(train_dir / manifest.REJECTED):
        path = urlparse(rejection["url"]).path.lstrip("/")
        outcomes[path] = "download_failed" if rejection["stage"] == "download" else f"rejected:{rejection['reason']}"
    for sample in shard_io.read_samples(sorted(train_dir.glob("*.tar"))):
        path = urlparse(json.loads(sample["json"])["url"]).path.lstrip("/")
        assert path not in outcomes, f"{path} is both kept and dropped"
        outcomes[path], kept[path] = "kept", sample
    return outcomes, kept


def test_every_entry_ends_where_it_should(demo_shards):
    outcomes, _ = outcome_by_path(demo_shards["train"])
    expected = {item.path: item.expected for item in demo_shards["items"]}
    assert outcomes == expected


def test_manifest_reconciles_exactly(demo_shards):
    counts = demo_shards["manifest"]["reconciliation"]
    items = demo_shards["items"]
    assert counts["url_list_rows"] == len(items)
    assert sum(counts["download_failed"].values()) == sum(i.expected == "download_failed" for i in items)
    assert counts["kept"] == sum(i.expected == "kept" for i in items)
    assert counts["in_raw"] == counts["kept"] + sum(counts["rejected"].values())
    assert counts["download_balanced"] and counts["shards_balanced"]
    assert shards.verify(demo_shards["train"]) == []


def test_repairs(demo_shards):
    _, kept = outcome_by_path(demo_shards["train"])
    assert kept["mojibake.jpg"]["txt"].decode() == "a red circle on a café table"
    for path in ("cmyk.jpg", "gray.jpg", "alpha.png", "anim.gif", "rotated.jpg"):
        image = Image.open(io.BytesIO(kept[path]["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB", path
    rotated = Image.open(io.BytesIO(kept["rotated.jpg"]["jpg"]))
    assert rotated.size == (120, 160)  # EXIF orientation 6 applied: landscape became portrait
    red, green, blue = np.asarray(rotated).reshape(-1, 3).mean(0)
    assert red > 150 and green < 80 and blue < 80
    red, green, blue = np.asarray(Image.open(io.BytesIO(kept["cmyk.jpg"]["jpg"]))).reshape(-1, 3).mean(0)
    assert red > green and red > blue  # colours survive the CMYK conversion (the circle is red)


def test_shards_read_back_through_webdataset(demo_shards):
    urls = [str(p) for p in sorted(demo_shards["train"].glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "tokens")
    count = 0
    for image, caption, tokens in dataset:
        assert image.mode == "RGB" and caption and len(tokens) == 77 * 4
        count += 1
    assert count == demo_shards["manifest"]["totals"]["samples"]


def test_shards_read_back_through_dali_with_its_indexes(demo_shards):
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(demo_shards["train"].glob("*.tar"))
    batch_size = 16

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def pipeline():
        jpegs, tokens = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "tokens"], dtypes=[types.UINT8, types.INT32], name="reader",
            missing_component_behavior="error")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), tokens

    pipe = pipeline()
    pipe.build()
    total = demo_shards["manifest"]["totals"]["samples"]
    assert pipe.epoch_size("reader") == total
    seen = 0
    while seen < total:
        images, tokens = pipe.run()
        for index in range(min(batch_size, total - seen)):
            assert np.array(images.at(index)).shape[2] == 3
            assert np.array(tokens.at(index))[0] == 49406
        seen += batch_size
