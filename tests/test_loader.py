"""make_loader: rank split, reproducible order, exact resume, bad samples, the Batch contract."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_training_shards

from datapipe import MultiCrop, SingleCrop, aclip_views, clip_rocket_views, make_loader, slip_views
from datapipe.common import shard_io
from datapipe.load.ibot_masks import block_mask, ibot_masks
from datapipe.load.recipes import BlockMasking, CropAugment
from datapipe.load.samples import ShardSet, rank_order

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
    orders = [rank_order(shards, seed=3, epoch=1, rank=rank, world_size=3, batch_size=4, shuffle_window=40)
              for rank in range(3)]
    assert {len(order) for order in orders} == {(217 // 12) * 4}
    pairs = [tuple(pair) for order in orders for pair in order]
    assert len(set(pairs)) == len(pairs) == 217 - 217 % 12  # disjoint; only the last partial global batch is out


def test_the_global_sequence_does_not_depend_on_the_number_of_ranks():
    """Global batch b holds the same samples in the same order on 1, 2 or 4 ranks (elastic resume)."""
    shards = ShardSet(root=None, names=("a", "b", "c"), sizes=(40, 33, 40))
    one = rank_order(shards, seed=5, epoch=2, rank=0, world_size=1, batch_size=8, shuffle_window=16)
    for world_size in (2, 4):
        per_rank = [rank_order(shards, 5, 2, rank, world_size, 8 // world_size, 16).reshape(-1, 8 // world_size, 2)
                    for rank in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(per_rank, axis=1).reshape(-1, 2), one)


def test_order_is_reproducible_per_seed_and_epoch():
    shards = ShardSet(root=None, names=("a", "b", "c"), sizes=(40, 40, 40))
    order = lambda seed, epoch: rank_order(shards, seed, epoch, rank=0, world_size=1, batch_size=1,  # noqa: E731
                                           shuffle_window=32)
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


def batches_of(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


RECIPES = {"multicrop": SMALL, "singlecrop": SingleCrop(size_px=32), "slip": slip_views(32),
           "clip_rocket": clip_rocket_views(32), "aclip": aclip_views(32)}


def assert_same_views(got, expected):
    """Keys, and every named image, text, mask and box tensor, bit for bit."""
    assert got.keys == expected.keys
    for part in ("images", "texts", "masks", "boxes"):
        assert getattr(got, part).keys() == getattr(expected, part).keys(), part
        for name, tensor in getattr(expected, part).items():
            torch.testing.assert_close(getattr(got, part)[name], tensor, rtol=0, atol=0, msg=f"{part}[{name!r}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_resumed_batches_equal_the_uninterrupted_ones_pixel_for_pixel(demo_shards, recipe, backend):
    """Every view of every recipe, not only keys: the augmentations (crops, colour, masks, boxes, captions) do
    not depend on where a loader started."""
    # Each torch worker loads the BPE vocabulary and WordNet for text views (seconds on 2 shared cores): none here.
    workers = 0 if backend == "torch" and recipe == "clip_rocket" else 2
    settings = dict(recipe=RECIPES[recipe], batch_size=8, backend=backend, seed=3, num_workers=workers)
    uninterrupted = batches_of(make_loader(demo_shards["train"], **settings), 4)
    first = make_loader(demo_shards["train"], **settings)
    batches_of(first, 2)
    resumed = make_loader(demo_shards["train"], **settings)
    resumed.load_state_dict(first.state_dict())
    for expected, got in zip(uninterrupted[2:], batches_of(resumed, 2), strict=True):
        assert_same_views(got, expected)


def test_text_views_are_the_same_on_both_backends(demo_shards):
    """Captions are augmented in the reader stage, before the backends part: the same tokens on DALI and torch."""
    texts = [next(iter(make_loader(demo_shards["train"], clip_rocket_views(32), 8, backend=backend, seed=2,
                                   num_workers=0 if backend == "torch" else 1))).texts for backend in BACKENDS]
    assert texts[0].keys() == {"weak_text", "strong_text"}
    for name in texts[0]:
        torch.testing.assert_close(texts[0][name], texts[1][name], rtol=0, atol=0)
    strong = texts[0]["strong_text"]  # (2, B, 77): the two strong captions of a sample differ somewhere
    assert strong.shape == (2, 8, 77) and not torch.equal(strong[0], strong[1])


def test_dali_batches_on_two_ranks_are_the_one_rank_batch_split(demo_shards):
    """Elastic determinism on the default backend: the same samples with the same crops on 1 or 2 ranks."""
    whole = batches_of(make_loader(demo_shards["train"], SMALL, 8, backend="dali", seed=4), 2)
    halves = [batches_of(make_loader(demo_shards["train"], SMALL, 4, backend="dali", seed=4, rank=rank,
                                     world_size=2), 2) for rank in range(2)]
    for number, expected in enumerate(whole):
        first, second = halves[0][number], halves[1][number]
        assert first.keys + second.keys == expected.keys
        torch.testing.assert_close(torch.cat([first.global_crops, second.global_crops], dim=1), expected.global_crops,
                                   rtol=0, atol=0)


def test_backends_read_the_same_samples_in_the_same_order(demo_shards):
    keys = [keys_of(make_loader(demo_shards["train"], SMALL, 8, backend=backend, seed=1), limit=4)
            for backend in BACKENDS]
    assert keys[0] == keys[1]


def test_two_ranks_split_the_epoch(demo_shards):
    per_rank = [keys_of(make_loader(demo_shards["train"], SMALL, 8, backend="dali", rank=rank, world_size=2))
                for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(per_rank[0]) == len(per_rank[1])


def test_resume_on_other_ranks_needs_the_same_global_batch(demo_shards):
    two_ranks = make_loader(demo_shards["train"], SMALL, 4, rank=0, world_size=2)
    batches_of(two_ranks, 2)
    one_rank = make_loader(demo_shards["train"], SMALL, 8)
    one_rank.load_state_dict(two_ranks.state_dict())  # 2 x 4 = 1 x 8: accepted
    assert one_rank.batches_done == 2
    with pytest.raises(ValueError, match="global_batch_size=8.*batch_size x world_size"):
        make_loader(demo_shards["train"], SMALL, 4).load_state_dict(two_ranks.state_dict())
    with pytest.raises(ValueError, match="seed"):
        make_loader(demo_shards["train"], SMALL, 8, seed=1).load_state_dict(two_ranks.state_dict())


@pytest.mark.parametrize("arguments, message", [
    (dict(batch_size=0), "batch_size=0"), (dict(batch_size=-3), "batch_size=-3"),
    (dict(rank=2, world_size=2), "rank must be in 0 .. world_size - 1"), (dict(rank=0, world_size=0), "rank"),
])
def test_impossible_loader_values_are_refused(demo_shards, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_loader(demo_shards["train"], SMALL, **{"batch_size": 8, **arguments})


def test_iterating_again_starts_the_next_epoch(demo_shards):
    loader = make_loader(demo_shards["train"], SMALL, 32, backend="dali")
    first = keys_of(loader)
    second = keys_of(loader)
    assert len(second) == len(first) > 0 and second != first and loader.epoch == 1


def test_dali_builds_one_pipeline_per_loader_and_each_epoch_equals_a_fresh_pipelines(demo_shards, monkeypatch):
    """Whole epochs, an epoch left early and a resume mid-epoch all go through the loader's one DALI pipeline, and
    give bit for bit the batches of a pipeline built for that epoch alone (as each epoch had before)."""
    from datapipe.load import dali

    settings = dict(recipe=SMALL, batch_size=24, backend="dali", seed=5)
    fresh = {epoch: batches_of(make_loader(demo_shards["train"], epoch=epoch, **settings), 5) for epoch in range(4)}
    built = []
    build = dali._views_pipeline
    monkeypatch.setattr(dali, "_views_pipeline", lambda **arguments: built.append(1) or build(**arguments))
    loader = make_loader(demo_shards["train"], **settings)
    assert len(loader) == 5
    got = {0: batches_of(loader, 5), 1: batches_of(loader, 2)}  # epoch 1 left after two batches
    loader.set_epoch(2)
    got[2] = batches_of(loader, 5)
    loader.load_state_dict({**loader.state_dict(), "epoch": 3, "batches_done": 3})  # a resume at batch 3
    got[3] = batches_of(loader, 5)
    assert len(built) == 1
    assert [len(batches) for batches in got.values()] == [5, 2, 5, 2]
    for epoch, batches in got.items():
        for expected, batch in zip(fresh[epoch][3:] if epoch == 3 else fresh[epoch], batches, strict=False):
            assert_same_views(batch, expected)


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


def damage(jpeg, kind):
    """A JPEG damaged as a disk or a copy can damage it."""
    if kind == "start_marker":
        return b"\0\0" + jpeg[2:]
    if kind == "header":  # the frame header (SOF0) says the image is 0 x 0
        sof = jpeg.index(b"\xff\xc0")
        return jpeg[:sof + 5] + b"\0\0\0\0" + jpeg[sof + 9:]
    return jpeg[:len(jpeg) // 2]  # the body cut short: the header parses, the decoder fails


REASONS = {"start_marker": "jpg does not start with a JPEG marker", "header": "jpg header does not parse",
           "body": "jpg does not decode"}


@pytest.mark.parametrize("kind", ["start_marker", "header", "body"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_sample_is_replaced_counted_and_reported(tmp_path, backend, kind, caplog):
    images = [np.random.default_rng(number).integers(0, 256, (48, 48, 3), dtype=np.uint8) for number in range(20)]
    train = write_training_shards(tmp_path / "train", images, samples_per_shard=10)
    samples = list(shard_io.read_samples([train / "000001.tar"]))
    key = samples[4]["__key__"]
    samples[4]["jpg"] = damage(samples[4]["jpg"], kind)
    shard_io.write_tar(train / "000001.tar", [{name: value for name, value in sample.items() if name != "__url__"}
                                              for sample in samples])
    shard_io.write_dali_index(train / "000001.tar", train / "000001.idx")
    loader = make_loader(train, SMALL, 6, backend=backend, num_workers=0)
    keys = keys_of(loader)
    assert len(keys) == 18 and f"000001/{key}" not in keys  # 3 full batches: another sample stood in
    assert [skipped_key for skipped_key, _ in loader.skipped] == [f"000001/{key}"]
    assert loader.skipped[0][1].startswith(REASONS[kind]), loader.skipped
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
