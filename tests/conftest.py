"""Shared fixtures. `demo_shards` runs the real pipeline once per test session:
generate a small demo set, serve it on 127.0.0.1, download it with img2dataset, build shards
(demo/end_to_end.py; on a machine without img2dataset, a copy of sets built elsewhere)."""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import demo.end_to_end
from datapipe.common import shard_io
from model.meta_arch import MetaArch, ModelConfig
from train.pretrain import TEACHER_WEIGHTS, save_teacher_weights


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    return demo.end_to_end.build_or_copy(tmp_path_factory.mktemp("demo"), *demo.end_to_end.TEST_SETS["small"])


@pytest.fixture(scope="session")
def larger_demo_shards(tmp_path_factory):
    """Enough pairs for a short training run to learn something."""
    return demo.end_to_end.build_or_copy(tmp_path_factory.mktemp("demo_larger"), *demo.end_to_end.TEST_SETS["larger"])


def jpeg_bytes(width_px=96, height_px=80, color=(200, 30, 30), mode="RGB", fmt="JPEG", **save):
    image = Image.new("RGB", (width_px, height_px), color)
    # A coarse random pattern in green, drawn from the size and colour: two sizes are two different pictures
    # (not near duplicates of each other), and the same arguments give the same pixels.
    pattern = np.random.default_rng([width_px, height_px, *color]).integers(0, 256, (4, 4), dtype=np.uint8)
    pixels = np.asarray(image).copy()
    pixels[:, :, 1] = np.asarray(Image.fromarray(pattern).resize((width_px, height_px), Image.Resampling.NEAREST))
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_raw_shard(raw_dir, shard_id, samples, failures=()):
    """Write what img2dataset writes for one shard: tar, parquet, stats.

    `samples` are (image bytes, caption) pairs; `failures` are error messages of urls that
    failed to download."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rows, tar_samples = [], []
    for index, (data, caption) in enumerate(samples):
        key = f"{shard_id:05d}{index:04d}"
        url = f"http://127.0.0.1/{key}.jpg"
        tar_samples.append({"__key__": key, "jpg": data, "txt": caption.encode(),
                            "json": json.dumps(dict(url=url, key=key, caption=caption)).encode()})
        rows.append(dict(key=key, url=url, status="success", error_message=None))
    for index, message in enumerate(failures, start=len(samples)):
        key = f"{shard_id:05d}{index:04d}"
        rows.append(dict(key=key, url=f"http://127.0.0.1/{key}.jpg", status="failed_to_download",
                         error_message=message))
    shard_io.write_tar(raw_dir / f"{shard_id:05d}.tar", tar_samples)
    pq.write_table(pa.Table.from_pylist(rows), raw_dir / f"{shard_id:05d}.parquet")
    stats = dict(count=len(rows), successes=len(samples), failed_to_download=len(failures))
    (raw_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats))


def write_training_shards(train_dir, images, samples_per_shard):
    """Training shards as `make shards` writes them (tar, DALI index, manifest) from uint8 HWC arrays.

    Every sample gets the caption tokens SOT, 320 + i, EOT."""
    train_dir = Path(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for first in range(0, len(images), samples_per_shard):
        samples = []
        for number in range(first, min(first + samples_per_shard, len(images))):
            buffer = io.BytesIO()
            Image.fromarray(images[number]).save(buffer, format="JPEG", quality=95)
            tokens = np.zeros(77, dtype="<i4")
            tokens[:3] = (49406, 320 + number, 49407)
            samples.append({"__key__": f"{number:08d}", "jpg": buffer.getvalue(), "tokens": tokens.tobytes()})
        name = f"{first // samples_per_shard:06d}.tar"
        shard_io.write_tar(train_dir / name, samples)
        shard_io.write_dali_index(train_dir / name, (train_dir / name).with_suffix(".idx"))
        entries.append(dict(name=name, samples=len(samples)))
    (train_dir / "manifest.json").write_text(json.dumps(dict(shards=entries)))
    return train_dir


SMALL_TEXT = dict(text_width=64, text_layers=2, text_heads=4, clip_dim=32)
SMALL_HARMONY = {"ibot": {"out_dim": 64, "head_hidden_dim": 64}, "clip": {"soft_targets": True},
                 "mae": {"decoder_depth": 1}, "masked_text": {"distillation_out_dim": 32, "mlm_decoder_depth": 1}}


def fake_run(tmp_path, objectives=None, **towers):
    """A run folder as train.pretrain leaves it (Harmony's objectives by default, small), with teachers that differ
    from a fresh model."""
    torch.manual_seed(0)
    model = MetaArch(ModelConfig(**{**SMALL_TEXT, **towers}, objectives=objectives or SMALL_HARMONY))
    with torch.no_grad():
        for param in model.teachers.parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_teacher_weights(model, tmp_path / TEACHER_WEIGHTS)
    return tmp_path


@contextlib.contextmanager
def tmpfs(mount_point, options):
    """A tmpfs mounted at `mount_point` for the block (`options` as mount -o takes them: size=1m, ro,size=1m): a
    real file system that fills up or refuses writes. The test is skipped where none can be mounted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def small_file_system(tmp_path):
    """A 1 MiB tmpfs mounted for the test: a real file system that fills up."""
    with tmpfs(tmp_path / "small_disk", "size=1m") as mount_point:
        yield mount_point
