"""Per-sample draws for the DALI backend: a function of the sample's seed only, with the recipe's distributions."""

import numpy as np
import pytest
import torch
from torchvision import transforms

from datapipe.load.draws import COLUMN, crop_parameters, crop_windows, enclosing_windows, recipe_parameters, uniforms
from datapipe.load.recipes import CropAugment, EnclosingCrop, ImageView, MultiCrop, ViewRecipe, aclip_views


def test_draws_depend_on_the_sample_seed_and_crop_only():
    seeds = [11, 12, 13, 14]
    together = uniforms(seeds, crop_number=2, count=50)
    alone = np.concatenate([uniforms([seed], 2, 50) for seed in reversed(seeds)])[::-1]
    np.testing.assert_array_equal(together, alone)  # batch composition and order do not matter
    assert not np.array_equal(uniforms(seeds, 3, 50), together)
    assert together.min() >= 0 and together.max() < 1 and abs(uniforms(range(2000), 0, 50).mean() - 0.5) < 0.01


@pytest.mark.parametrize("height, width, scale", [(120, 200, (0.32, 1.0)), (300, 90, (0.05, 0.32))])
def test_crop_windows_follow_torchvision_sampler(height, width, scale):
    ratio, draws = (3 / 4, 4 / 3), 4000
    rng = np.random.default_rng(0)
    tries = [rng.random((draws, 10)) for _ in range(4)]
    windows = crop_windows([height] * draws, [width] * draws, scale, ratio, *tries)
    top, left, crop_h, crop_w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + crop_h <= height).all() and (left + crop_w <= width).all()
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    reference = np.array([transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
                          for _ in range(draws)])  # (top, left, height, width)
    for column in range(4):
        ours, theirs = windows[:, column], reference[:, column]
        assert abs(ours.mean() - theirs.mean()) < 0.05 * max(height, width), column
    area = lambda w: (w[:, 2] * w[:, 3]).mean() / (height * width)  # noqa: E731
    assert abs(area(windows) - area(reference)) < 0.02


def test_centre_crop_when_no_try_fits():
    """A 400 x 20 strip and an impossible scale: torchvision's fallback, the widest centred crop within the ratio."""
    ones = np.ones((1, 10))
    window = crop_windows([400], [20], (1.0, 1.0), (3 / 4, 4 / 3), ones * 0.5, ones * 0.5, ones * 0.5, ones * 0.5)
    assert window.tolist() == [[(400 - 27) // 2, 0, 27, 20]]  # height = round(20 / (3/4))


def test_per_sample_choices_have_the_recipe_frequencies():
    crop = CropAugment(32, (0.3, 1.0), blur_prob=0.5, solarize_prob=0.2)
    parameters = crop_parameters(crop, 0, list(range(4000)), [(64, 80)] * 4000)
    frequency = lambda name: (parameters[:, COLUMN[name]] > 0.5).mean()  # noqa: E731
    assert abs(frequency("flip") - 0.5) < 0.03 and abs(frequency("blur") - 0.5) < 0.03
    assert abs(frequency("solarize") - 0.2) < 0.03
    grey = parameters[:, COLUMN["saturation"]] == 0
    assert abs(grey.mean() - 0.2) < 0.03
    jittered = parameters[:, COLUMN["brightness"]] != 1
    assert abs(jittered.mean() - 0.8) < 0.03
    assert parameters[:, COLUMN["brightness"]].min() >= 0.6 and parameters[:, COLUMN["brightness"]].max() <= 1.4


def test_enclosing_windows_hold_the_enclosed_ones_and_reach_towards_the_borders():
    rng = np.random.default_rng(3)
    count, height, width = 4000, 120, 200
    enclosed = np.stack([crop_windows([height] * count, [width] * count, (0.5, 1.0), (3 / 4, 4 / 3),
                                      *[rng.random((count, 10)) for _ in range(4)]) for _ in range(2)])  # (2, N, 4)
    windows = enclosing_windows(enclosed, [height] * count, [width] * count, rng.random((count, 4)))
    top, left, crop_h, crop_w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + crop_h <= height).all() and (left + crop_w <= width).all()
    assert (top <= enclosed[..., 0].min(axis=0)).all() and (left <= enclosed[..., 1].min(axis=0)).all()
    assert (top + crop_h >= (enclosed[..., 0] + enclosed[..., 2]).max(axis=0)).all()
    assert (left + crop_w >= (enclosed[..., 1] + enclosed[..., 3]).max(axis=0)).all()
    union_top = enclosed[..., 0].min(axis=0)
    assert abs((top / np.maximum(union_top, 1))[union_top > 0].mean() - 0.5) < 0.05  # uniform in [0, union top]
    sure = enclosing_windows(enclosed, [height] * count, [width] * count, np.full((count, 4), 0.999))
    assert (sure[:, 0] == union_top).all() and (sure[:, 0] + sure[:, 2] == height).all()


def test_recipe_parameters_key_each_crop_by_its_place_in_the_recipe():
    """MultiCrop's crops draw as before named views (crop number = place), and an enclosing crop is no flip, no
    colour, around its view."""
    recipe = MultiCrop(local_crops_number=2)
    seeds, sizes = list(range(50)), [(90, 120)] * 50
    parameters = recipe_parameters(recipe, seeds, sizes)
    for number, crop in enumerate(recipe.crops):
        np.testing.assert_array_equal(parameters[number], crop_parameters(crop, number, seeds, sizes))
    online, _, enclosing = recipe_parameters(aclip_views(32), seeds, sizes)
    assert (enclosing[:, COLUMN["flip"]] == 0).all() and (enclosing[:, COLUMN["brightness"]] == 1).all()
    assert (enclosing[:, COLUMN["top"]] <= online[:, COLUMN["top"]]).all()


@pytest.mark.parametrize("make, message", [
    (lambda: ViewRecipe({"enclosing": EnclosingCrop("online"), "online": ImageView((CropAugment(32, (0.5, 1.0)),))}),
     "must be an ImageView named before it"),
    (lambda: ViewRecipe({"enclosing": EnclosingCrop("missing")}), "'missing'"),
    (lambda: ImageView((CropAugment(32, (0.5, 1.0)), CropAugment(16, (0.5, 1.0)))), r"sizes \[16, 32\] px"),
    (lambda: CropAugment(32, (0.5, 1.0), interpolation="nearest"), "interpolation='nearest'"),
    (lambda: ViewRecipe({"caption": ImageView((CropAugment(32, (0.5, 1.0)),))}), "both an image view and a text"),
])
def test_recipes_no_backend_can_make_are_refused_with_the_reason(make, message):
    with pytest.raises(ValueError, match=message):
        make()
