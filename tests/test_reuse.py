"""The pipeline as a library: an open_clip model trains on our shards; the crop grid is drawn."""

import math

from examples.train_open_clip import train
from tools.show_crops import show_crops


def test_open_clip_trains_on_our_shards_and_its_loss_falls(demo_shards):
    batch_size = 16
    losses = train(demo_shards["train"], steps=40, batch_size=batch_size, backend="dali")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.9 * math.log(batch_size) and last < first - 0.4, (first, last)


def test_show_crops_writes_a_png_grid(demo_shards, tmp_path):
    out = show_crops(demo_shards["train"], tmp_path / "crops.png", samples=2, backend="torch")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
