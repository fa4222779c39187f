"""MultiCrop and SingleCrop as named-view recipes give pixel for pixel what they gave before named views.

tests/data/views_before_named_views.json holds sha256 digests of the batches the code made before
named views existed (commit 2635df0), computed by `pinned_digests` below on the same shards."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_training_shards

from datapipe import MultiCrop, SingleCrop, make_loader
from datapipe.load.recipes import CropAugment

PINNED = Path(__file__).parent / "data" / "views_before_named_views.json"
RECIPES = {
    "multicrop": MultiCrop(global_1=CropAugment(32, (0.32, 1.0), blur_prob=1.0),
                           global_2=CropAugment(32, (0.32, 1.0), blur_prob=0.1, solarize_prob=0.2),
                           local=CropAugment(16, (0.05, 0.32), blur_prob=0.5), local_crops_number=3, patch_size=8),
    "singlecrop": SingleCrop(size_px=32),
}
FIELDS = ("global_crops", "local_crops", "ibot_masks", "tokens")


def smooth_images(count=16):
    """Different pictures with edges and gradients, so every crop, flip and colour change shows in the pixels."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
        image = np.kron(coarse, np.ones((8, 8, 1)))  # (48, 64, 3) blocks
        image += np.linspace(0, 40, 64)[None, :, None]
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def digest(tensor):
    return hashlib.sha256(tensor.cpu().contiguous().numpy().tobytes()).hexdigest()


def pinned_digests(shards, recipe, backend):
    """{field: digest} of the first two batches of 8 (float32 crops), and their keys."""
    loader = make_loader(shards, recipe, 8, backend=backend, seed=5, num_workers=0 if backend == "torch" else 2)
    found = {}
    for number, batch in enumerate(loader):
        if number == 2:
            break
        found[f"{number}/keys"] = batch.keys
        for field in FIELDS:
            found[f"{number}/{field}"] = digest(getattr(batch, field))
    return found


@pytest.fixture(scope="module")
def pinned_shards(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("pinned") / "train", smooth_images(), 8)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_give_the_pixels_they_gave_before_named_views(pinned_shards, name, backend):
    expected = json.loads(PINNED.read_text())[f"{name}/{backend}"]
    assert pinned_digests(pinned_shards, RECIPES[name], backend) == expected
