"""iBOT block masks (BEiT-style blocks), made per crop on the CPU like the official data workers.

docs/methods/harmony.md 5.3: a ratio is picked per crop among candidates ({0, U(0.1, 0.5)} by default);
blocks of random area and aspect are added until the masked count reaches ratio * H * W.
"""

import math

import numpy as np


def pick_ratio(rng, masking):
    """One crop's target ratio: a uniformly chosen candidate, each U(mean - var, mean + var)."""
    candidates = [rng.uniform(mean - var, mean + var) if var > 0 else mean
                  for mean, var in zip(masking.pred_ratio, masking.pred_ratio_var, strict=True)]
    return candidates[rng.integers(len(candidates))]


def block_mask(rng, grid, ratio, min_aspect=0.3, attempts_per_block=10):
    """(H, W) bool mask with about ratio * H * W patches masked, in rectangular blocks."""
    height, width = grid
    mask = np.zeros(grid, dtype=bool)
    target = int(ratio * height * width)
    min_block_area = (min(height, width) // 3) ** 2
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masked = 0
    while masked < target:
        remaining = target - masked
        added = 0
        for _ in range(attempts_per_block):
            area = min_block_area + (remaining - min_block_area) * rng.random()  # U(low, high), even if high < low
            aspect = math.exp(rng.uniform(*log_aspect))
            block_h, block_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if block_h >= height or block_w >= width:
                continue
            top, left = rng.integers(0, height - block_h + 1), rng.integers(0, width - block_w + 1)
            window = mask[top:top + block_h, left:left + block_w]
            new = block_h * block_w - int(window.sum())
            if 0 < new <= remaining:
                window[:] = True
                added = new
                break
        if added == 0:
            break
        masked += added
    return mask


def ibot_masks(rng, masking, grid, crops=2):
    """(crops, H, W) bool masks for one sample's global crops; True = the student sees the mask token."""
    return np.stack([block_mask(rng, grid, pick_ratio(rng, masking), masking.min_aspect,
                                masking.attempts_per_block) for _ in range(crops)])


def mask_generator(sample_seed, first_crop):
    """The masks' random stream of a view whose first crop is `first_crop` in the recipe: the sample seed alone
    for crop 0 (the global crops of MultiCrop, as before named views), (seed, first_crop) for any other view."""
    return np.random.default_rng(sample_seed if first_crop == 0 else [sample_seed, first_crop])


def view_masks(recipe, sample_seeds):
    """image view name -> (n, B, H, W) bool block masks, for each view of `recipe` that asks for masking."""
    masks = {}
    for name, view in recipe.image_views.items():
        if view.masking is not None:
            first = recipe.crop_slices[name].start
            masks[name] = np.stack([ibot_masks(mask_generator(seed, first), view.masking, view.mask_grid,
                                               len(view.crops)) for seed in sample_seeds], axis=1)  # (n, B, H, W)
    return masks
