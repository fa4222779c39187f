"""Per-sample augmentation choices: frequencies and crop geometry match the recipe, on both backends.

Each test switches on one random step and reads its effect back from the pixels, so a choice that
is made per batch, or with the wrong probability, fails."""

import numpy as np
import pytest
import torch
from conftest import write_training_shards
from torchvision import transforms

from datapipe import MultiCrop, make_loader
from datapipe.views import CropAugment

BACKENDS = ["dali", "torch"]
SAMPLES, BATCH = 256, 64
LEFT, RIGHT = (40, 80, 160), (200, 160, 60)  # RGB of the two halves of the edge image


def plain(size_px=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **changes):
    """A crop with every random step off unless named: the full image, resized."""
    off = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    return CropAugment(size_px, scale, ratio, **{**off, **changes})


@pytest.fixture(scope="module")
def edge_shards(tmp_path_factory):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32], image[:, 32:] = LEFT, RIGHT
    return write_training_shards(tmp_path_factory.mktemp("edge") / "train", [image] * SAMPLES, 100)


@pytest.fixture(scope="module")
def ramp_shards(tmp_path_factory):
    """Red grows with x and green with y, so a crop's pixels tell where it came from."""
    ramp = np.linspace(0, 255, 128)
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    return write_training_shards(tmp_path_factory.mktemp("ramp") / "train", [image] * SAMPLES, 100)


def pixels_of(shards, crop, backend):
    """(SAMPLES, 3, H, W) uint8-scale pixels of the first global crop, per batch of BATCH."""
    recipe = MultiCrop(global_1=crop, global_2=plain(crop.size_px), local=plain(16), local_crops_number=0,
                       patch_size=16)
    loader = make_loader(shards, recipe, BATCH, backend=backend, seed=11, num_workers=2)
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    return torch.cat([(batch.global_crops[0].float().cpu() * std + mean) * 255 for batch in loader])


def chosen_fraction(chosen):
    """Overall share of samples where the step happened; it must also vary within each batch."""
    per_batch = chosen.float().reshape(-1, BATCH).mean(dim=1)
    assert ((per_batch > 0) & (per_batch < 1)).all(), f"a step chosen per batch, not per sample: {per_batch}"
    return chosen.float().mean().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_frequency(edge_shards, backend):
    pixels = pixels_of(edge_shards, plain(grayscale_prob=0.2), backend)
    channel_spread = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2))
    assert abs(chosen_fraction(channel_spread < 12) - 0.2) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_frequency(edge_shards, backend):
    red = pixels_of(edge_shards, plain(flip_prob=0.5), backend)[:, 0]
    assert abs(chosen_fraction(red[:, :, :8].mean(dim=(1, 2)) > red[:, :, -8:].mean(dim=(1, 2))) - 0.5) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_solarize_frequency(edge_shards, backend):
    red = pixels_of(edge_shards, plain(solarize_prob=0.2), backend)[:, 0]
    assert abs(chosen_fraction(red[:, :, -8:].mean(dim=(1, 2)) < 128) - 0.2) < 0.1  # 200 -> 55 when solarized


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_frequency(edge_shards, backend):
    red = pixels_of(edge_shards, plain(blur_prob=0.5, blur_sigma=(2.0, 2.0)), backend)[:, 0]
    profile = red.mean(dim=1)  # (N, W): the edge is vertical
    steepest = (profile[:, 1:] - profile[:, :-1]).abs().amax(dim=1) / (RIGHT[0] - LEFT[0])
    assert abs(chosen_fraction(steepest < 0.35) - 0.5) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_colour_jitter_frequency(edge_shards, backend):
    crop = plain(jitter_prob=0.8, contrast=0.0, saturation=0.0, hue=0.0)  # brightness only
    pixels = pixels_of(edge_shards, crop, backend)
    baseline = pixels_of(edge_shards, plain(), backend).mean(dim=(1, 2, 3))
    changed = (pixels.mean(dim=(1, 2, 3)) - baseline).abs() > 2
    assert abs(chosen_fraction(changed) - 0.8) < 0.1


def crop_geometry(pixels):
    """Width and height of each crop as fractions of the image, from the ramps' ranges."""
    red, green = pixels[:, 0], pixels[:, 1]
    width = (red.amax(dim=(1, 2)) - red.amin(dim=(1, 2))) / 255
    height = (green.amax(dim=(1, 2)) - green.amin(dim=(1, 2))) / 255
    return width, height


def expected_mean_area(scale, ratio, draws=4000):
    """torchvision's own crop sampler (10 tries, then a centre crop) on a 128 px square."""
    torch.manual_seed(0)
    image = torch.zeros(1, 128, 128)
    areas = [height * width / 128**2
             for _, _, height, width in (transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
                                         for _ in range(draws))]
    return float(np.mean(areas))


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_area_and_aspect_distributions_agree(ramp_shards, scale):
    expected_area = expected_mean_area(scale, (3 / 4, 4 / 3))
    measured = {}
    for backend in BACKENDS:
        # Resampling narrows the ramps' ranges a little: calibrate on the whole image.
        full_width, full_height = crop_geometry(pixels_of(ramp_shards, plain(32), backend))
        width, height = crop_geometry(pixels_of(ramp_shards, plain(32, scale, ratio=(3 / 4, 4 / 3)), backend))
        width, height = width / full_width.mean(), height / full_height.mean()
        measured[backend] = ((width * height).mean().item(), (width / height).log().mean().item(),
                             (width * height).std().item())
    for area, log_aspect, _ in measured.values():
        assert abs(area - expected_area) < 0.05 and abs(log_aspect) < 0.1, measured
    (dali_area, _, dali_spread), (torch_area, _, torch_spread) = measured["dali"], measured["torch"]
    assert abs(dali_area - torch_area) < 0.05 and abs(dali_spread - torch_spread) < 0.05, measured
