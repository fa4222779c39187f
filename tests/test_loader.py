"""make_loader: rank split, reproducible order, exact resume, bad samples, the Batch contract."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_training_shards

from datapipe import MultiCrop, SingleCrop, make_loader
from datapipe.masks import block_mask, ibot_masks
from datapipe.samples import ShardSet, rank_order
from datapipe.shard_io import read_dali_index
from datapipe.views import BlockMasking, CropAugment

BACKENDS = ["dali", "torch"]
SMALL = MultiCrop(global_1=CropAugment(32, (0.32, 1.0), blur_prob=1.0),
                  global_2=CropAugment(32, (0.32, 1.0), blur_prob=0.1, solarize_prob=0.2),
                  local=CropAugment(16, (0.05, 0.32), blur_prob=0.5), local_crops_number=3, patch_size=8)


def keys_of(loader, limit=None):
    keys = []
    for number, batch in enumerate(loader):
        keys += batch.keys
        if limit is not None and number + 1 == limit:
            break
    return keys


def test_ranks_are_disjoint_equal_and_cover_the_epoch():
    shards = ShardSet(root=None, names=("a", "b", "c", "d", "e"), sizes=(50, 50, 50, 50, 17))  # uneven
    orders = [rank_order(shards, seed=3, epoch=1, rank=rank, world_size=3, shuffle_window=40) for rank in range(3)]
    assert {len(order) for order in orders} == {217 // 3}
    pairs = [tuple(pair) for order in orders for pair in order]
    assert len(set(pairs)) == len(pairs) == 217 - 217 % 3  # disjoint; only the remainder is left out
    shards_read = [len(set(order[:, 0].tolist())) for order in orders]
    assert max(shards_read) <= 3  # contiguous slices: each rank touches few shards


def test_order_is_reproducible_per_seed_and_epoch():
    shards = ShardSet(root=None, names=("a", "b", "c"), sizes=(40, 40, 40))
    order = lambda seed, epoch: rank_order(shards, seed, epoch, rank=0, world_size=1, shuffle_window=32)  # noqa: E731
    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1)) and not np.array_equal(order(0, 0), order(1, 0))
    assert sorted(map(tuple, order(0, 1))) == sorted(map(tuple, order(0, 0)))  # the same samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_yields_the_uninterrupted_keys(demo_shards, backend):
    settings = dict(recipe=SMALL, batch_size=8, backend=backend, seed=7, epoch=2, num_workers=2, shuffle_window=30)
    uninterrupted = keys_of(make_loader(demo_shards["train"], **settings))
    first = make_loader(demo_shards["train"], **settings)
    before = keys_of(first, limit=3)
    resumed = make_loader(demo_shards["train"], **{**settings, "epoch": 0})
    resumed.load_state_dict(first.state_dict())
    after = keys_of(resumed)
    assert before + after == uninterrupted
    assert len(uninterrupted) == len(first) * 8 == (demo_shards["manifest"]["totals"]["samples"] // 8) * 8
    assert len(set(uninterrupted)) == len(uninterrupted)


def test_backends_read_the_same_samples_in_the_same_order(demo_shards):
    keys = [keys_of(make_loader(demo_shards["train"], SMALL, 8, backend=backend, seed=1), limit=4)
            for backend in BACKENDS]
    assert keys[0] == keys[1]


def test_two_ranks_split_the_epoch(demo_shards):
    per_rank = [keys_of(make_loader(demo_shards["train"], SMALL, 8, backend="dali", rank=rank, world_size=2))
                for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(per_rank[0]) == len(per_rank[1])


def test_resume_refuses_a_different_world_size(demo_shards):
    loader = make_loader(demo_shards["train"], SMALL, 8, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        make_loader(demo_shards["train"], SMALL, 8).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract_and_training_dtype(demo_shards, backend):
    batch = next(iter(make_loader(demo_shards["train"], SMALL, 8, backend=backend, dtype=torch.bfloat16)))
    assert batch.global_crops.shape == (2, 8, 3, 32, 32) and batch.global_crops.dtype == torch.bfloat16
    assert batch.local_crops.shape == (3, 8, 3, 16, 16) and batch.local_crops.dtype == torch.bfloat16
    assert batch.ibot_masks.shape == (2, 8, 4, 4) and batch.ibot_masks.dtype == torch.bool
    assert batch.tokens.shape == (8, 77) and batch.tokens.dtype == torch.int64
    assert (batch.tokens[:, 0] == 49406).all() and len(batch.keys) == 8
    single = next(iter(make_loader(demo_shards["train"], SingleCrop(size_px=32), 8, backend=backend)))
    assert single.global_crops.shape == (1, 8, 3, 32, 32) and single.local_crops.shape[0] == 0
    assert single.ibot_masks.shape[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_sample_is_replaced_counted_and_reported(tmp_path, backend, caplog):
    images = [np.full((48, 48, 3), number * 10 % 250, dtype=np.uint8) for number in range(20)]
    train = write_training_shards(tmp_path / "train", images, samples_per_shard=10)
    key, components = read_dali_index(train / "000001.idx")[4]
    offset, _ = components["jpg"]
    with open(train / "000001.tar", "r+b") as tar:  # overwrite the JPEG start marker
        tar.seek(offset)
        tar.write(b"\0\0")
    loader = make_loader(train, SMALL, 6, backend=backend, num_workers=0)
    keys = keys_of(loader)
    assert len(keys) == 18 and f"000001/{key}" not in keys  # 3 full batches: a reserve sample stood in
    assert loader.skipped == [(f"000001/{key}", "jpg does not start with a JPEG marker")]
    assert f"000001/{key}" in caplog.text


def test_missing_manifest_and_compressed_shards_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make shards"):
        make_loader(tmp_path, SMALL, 8)
    (tmp_path / "manifest.json").write_text('{"shards": [{"name": "000000.tar.zst", "samples": 5}]}')
    with pytest.raises(ValueError, match="without --compress"):
        make_loader(tmp_path, SMALL, 8)


def test_block_masks_match_the_ibot_ratio_distribution():
    rng = np.random.default_rng(0)
    masks = np.stack([ibot_masks(rng, BlockMasking(), (14, 14)) for _ in range(400)]).reshape(800, 196)
    ratios = masks.mean(axis=1)
    assert abs((ratios == 0).mean() - 0.5) < 0.07  # half the crops are not masked
    masked = ratios[ratios > 0]
    assert masked.min() >= 0.07 and masked.max() <= 0.5 and abs(masked.mean() - 0.3) < 0.05
    one = block_mask(np.random.default_rng(1), (14, 14), 0.4)
    assert one.sum() <= int(0.4 * 196)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_gpu_decode_gives_the_same_samples_on_the_device(demo_shards):
    gpu = make_loader(demo_shards["train"], SMALL, 8, backend="dali", device="cuda", dtype=torch.bfloat16, seed=1)
    batch = next(iter(gpu))
    assert batch.global_crops.is_cuda and batch.global_crops.dtype == torch.bfloat16 and batch.tokens.is_cuda
    cpu = next(iter(make_loader(demo_shards["train"], SMALL, 8, backend="dali", seed=1)))
    assert batch.keys == cpu.keys


def test_a_script_without_main_guard_gets_the_fix_named(demo_shards, tmp_path):
    """Torch workers start from a fork server and re-run the user's script; without the guard that must say so."""
    script = tmp_path / "train.py"
    script.write_text("from datapipe import SingleCrop, make_loader\n"
                      f"loader = make_loader({str(demo_shards['train'])!r}, SingleCrop(size_px=32), 8, "
                      "backend='torch', num_workers=1)\n"
                      "next(iter(loader))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr.splitlines()[-1], done.stderr[-2000:]
