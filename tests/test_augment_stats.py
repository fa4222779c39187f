"""Per-sample augmentation choices: frequencies and crop geometry match the recipe, on both backends.

Each test switches on one random step and reads its effect back from the pixels, so a choice that
is made per batch, or with the wrong probability, fails. The named views of the SLIP, CLIP 🚀 and
A-CLIP recipes are read back the same way, one step at a time at the recipe's own numbers."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import write_training_shards
from torchvision import transforms

from datapipe import ImageView, ViewRecipe, aclip_views, clip_rocket_views, make_loader, slip_views
from datapipe.load.recipes import CropAugment, EnclosingCrop

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


def views_pixels(shards, recipe, backend):
    """{view name: (SAMPLES, n, 3, H, W) uint8-scale pixels}, {view name: (SAMPLES, n, 4) boxes}, per batch of BATCH."""
    loader = make_loader(shards, recipe, BATCH, backend=backend, seed=11, num_workers=2)
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    batches = list(loader)
    pixels = {name: torch.cat([(batch.images[name].float().cpu() * std + mean) * 255 for batch in batches],
                              dim=1).transpose(0, 1) for name in recipe.image_views}
    boxes = {name: torch.cat([batch.boxes[name] for batch in batches], dim=1).transpose(0, 1)
             for name in batches[0].boxes}
    return pixels, boxes


def pixels_of(shards, crop, backend):
    """(SAMPLES, 3, H, W) uint8-scale pixels of one crop."""
    return views_pixels(shards, ViewRecipe({"view": ImageView((crop,))}), backend)[0]["view"][:, 0]


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


RECIPE_CROPS = {  # every distinct crop of the methods' recipes, at 32 px
    "slip/clip": slip_views(32).image_views["global_crops"].crops[0],
    "slip/simclr": slip_views(32).image_views["simclr"].crops[0],
    "clip_rocket/weak": clip_rocket_views(32).image_views["weak"].crops[0],
    "clip_rocket/strong": clip_rocket_views(32).image_views["strong"].crops[0],
    "aclip/online": aclip_views(32).image_views["online"].crops[0],
}
NO_COLOUR = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
WHOLE_IMAGE = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)


def flipped(pixels):
    """Per crop of the ramp image: True where red falls from left to right."""
    red = pixels[:, 0]
    return red[:, :, :4].mean(dim=(1, 2)) > red[:, :, -4:].mean(dim=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(RECIPE_CROPS))
def test_recipe_crop_geometry_and_flip(ramp_shards, name, backend):
    crop = dataclasses.replace(RECIPE_CROPS[name], **NO_COLOUR)
    full_width, full_height = crop_geometry(pixels_of(ramp_shards, dataclasses.replace(crop, **WHOLE_IMAGE), backend))
    pixels = pixels_of(ramp_shards, crop, backend)
    width, height = crop_geometry(pixels)
    area = ((width / full_width.mean()) * (height / full_height.mean())).mean().item()
    assert abs(area - expected_mean_area(crop.scale, crop.ratio)) < 0.05, (area, crop.scale)
    assert abs(flipped(pixels).float().mean().item() - crop.flip_prob) < 0.1


COLOUR_STEPS = ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob")


def step_frequency(edge_shards, crop, step, backend):
    """Share of samples where `step` (one of COLOUR_STEPS) shows in the pixels of `crop` at the whole image."""
    alone = dataclasses.replace(crop, **WHOLE_IMAGE, **{**NO_COLOUR, step: getattr(crop, step)})
    if step == "blur_prob":
        alone = dataclasses.replace(alone, blur_sigma=(2.0, 2.0))
    if step == "jitter_prob":
        alone = dataclasses.replace(alone, contrast=0.0, saturation=0.0, hue=0.0)
    pixels = pixels_of(edge_shards, alone, backend)
    red = pixels[:, 0]
    if step == "grayscale_prob":
        chosen = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2)) < 12
    elif step == "solarize_prob":
        chosen = red[:, :, -8:].mean(dim=(1, 2)) < 128
    elif step == "blur_prob":
        profile = red.mean(dim=1)
        chosen = (profile[:, 1:] - profile[:, :-1]).abs().amax(dim=1) / (RIGHT[0] - LEFT[0]) < 0.35
    else:
        baseline = pixels_of(edge_shards, dataclasses.replace(alone, jitter_prob=0.0), backend)
        chosen = (pixels.mean(dim=(1, 2, 3)) - baseline.mean(dim=(1, 2, 3))).abs() > 2
    return chosen.float().mean().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, step", [(name, step) for name, crop in sorted(RECIPE_CROPS.items())
                                        for step in COLOUR_STEPS if getattr(crop, step) > 0])
def test_recipe_colour_steps_happen_at_the_recipe_rates(edge_shards, name, step, backend):
    crop = RECIPE_CROPS[name]
    assert abs(step_frequency(edge_shards, crop, step, backend) - getattr(crop, step)) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [name for name, crop in sorted(RECIPE_CROPS.items())
                                  if not any(getattr(crop, step) for step in COLOUR_STEPS)])
def test_views_without_colour_change_keep_the_pixels(edge_shards, name, backend):
    crop = dataclasses.replace(RECIPE_CROPS[name], **WHOLE_IMAGE)
    torch.testing.assert_close(pixels_of(edge_shards, crop, backend),
                               pixels_of(edge_shards, dataclasses.replace(crop, **NO_COLOUR), backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aclip_enclosing_crop_contains_both_online_crops(ramp_shards, backend):
    """Read back from the ramps' ranges and from the boxes: the zoom-out crop holds both online crops, and it is
    larger than their union on average (extended towards the borders)."""
    online = dataclasses.replace(RECIPE_CROPS["aclip/online"], **NO_COLOUR)
    recipe = ViewRecipe({"online": ImageView((online, online), boxes=True), "enclosing": EnclosingCrop("online", 32)})
    pixels, boxes = views_pixels(ramp_shards, recipe, backend)
    red, green = pixels["online"][:, :, 0], pixels["online"][:, :, 1]  # (N, 2, H, W)
    outer_red, outer_green = pixels["enclosing"][:, 0, 0], pixels["enclosing"][:, 0, 1]  # (N, H, W)
    slack = 8  # resampling blurs each crop's extreme pixels by a few levels
    assert (outer_red.amin(dim=(1, 2)) <= red.amin(dim=(2, 3)).amin(dim=1) + slack).all()
    assert (outer_red.amax(dim=(1, 2)) >= red.amax(dim=(2, 3)).amax(dim=1) - slack).all()
    assert (outer_green.amin(dim=(1, 2)) <= green.amin(dim=(2, 3)).amin(dim=1) + slack).all()
    assert (outer_green.amax(dim=(1, 2)) >= green.amax(dim=(2, 3)).amax(dim=1) - slack).all()
    inner, outer = boxes["online"], boxes["enclosing"][:, 0]  # (N, 2, 4), (N, 4) top, left, height, width
    assert (outer[:, None, :2] <= inner[..., :2]).all()
    assert (outer[:, None, :2] + outer[:, None, 2:] >= inner[..., :2] + inner[..., 2:]).all()
    union_area = ((inner[..., :2] + inner[..., 2:]).amax(dim=1) - inner[..., :2].amin(dim=1)).prod(dim=1)
    assert (outer[:, 2] * outer[:, 3]).mean() > 1.05 * union_area.mean()
    assert (outer[:, :2] >= 0).all() and (outer[:, :2] + outer[:, 2:] <= 128).all()  # inside the 128 px image
    # the boxes are where the pixels came from: the online crops' red range is their width in the ramp
    width_from_pixels = (red.amax(dim=(2, 3)) - red.amin(dim=(2, 3))) / 255
    assert ((width_from_pixels - inner[..., 3] / 128).abs() < 0.1).float().mean() > 0.9


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return write_training_shards(tmp_path_factory.mktemp("noise") / "train", [noise] * BATCH, 100)


def test_each_view_resizes_with_its_interpolation(noise_shards):
    """Noise upsampled 4x: bicubic keeps more of its contrast between neighbours than bilinear, on both backends,
    and the backends agree on each."""
    sharpness = {}
    for backend in BACKENDS:
        for interpolation in ("bicubic", "bilinear"):
            red = views_pixels(noise_shards, ViewRecipe({"view": ImageView((dataclasses.replace(
                plain(128), interpolation=interpolation),))}), backend)[0]["view"][:, 0, 0]  # (N, H, W)
            sharpness[backend, interpolation] = (red[:, :, 1:] - red[:, :, :-1]).abs().mean().item()
    for backend in BACKENDS:
        assert sharpness[backend, "bicubic"] > 1.15 * sharpness[backend, "bilinear"], sharpness
    for interpolation in ("bicubic", "bilinear"):
        assert abs(sharpness["dali", interpolation] / sharpness["torch", interpolation] - 1) < 0.03, sharpness
