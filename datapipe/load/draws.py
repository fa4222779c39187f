"""Per-sample random draws of a crop recipe, as a pure function of each sample's seed.

The DALI backend does not use DALI's random operators: their streams depend on where a pipeline
started, so a resumed run would see other augmentations. Instead every choice for every crop is
drawn here, vectorised over the batch, from counter-based uniforms keyed by (sample seed, crop,
draw), and handed to DALI as per-sample arguments. The distributions are the recipe's
(docs/methods/harmony.md 5.2); the crop window follows torchvision's RandomResizedCrop sampler (up to 10
tries of area and log-aspect, then a centre crop within the aspect range). A derived view's window
(`EnclosingCrop`) is drawn from the windows of the crops it encloses and 4 more uniforms of its own.
"""

import numpy as np

from datapipe.load.recipes import EnclosingCrop

CROP_TRIES = 10
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Per crop: area, log-aspect, top and left fractions for each try, then the single draws below.
SINGLE_DRAWS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "grey", "blur", "sigma", "solarize")
DRAWS_PER_CROP = 4 * CROP_TRIES + len(SINGLE_DRAWS)
# Columns of the (B, PARAMETERS) float32 array DALI reads for one crop.
PARAMETERS = ("top", "left", "bottom", "right", "flip", "brightness", "contrast", "saturation", "hue_degrees",
              "blur", "blur_sigma", "solarize")
COLUMN = {name: index for index, name in enumerate(PARAMETERS)}


def _splitmix64(values):
    """SplitMix64's output function, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        values = (values + np.uint64(0x9E3779B97F4A7C15)) & MASK64
        values = ((values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & MASK64
        values = ((values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & MASK64
        return values ^ (values >> np.uint64(31))


def uniforms(sample_seeds, crop_number, count):
    """(B, count) float64 in [0, 1): draw d of crop c of the sample with seed s depends on (s, c, d) only."""
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.asarray(sample_seeds, dtype=np.uint64) * np.uint64(0x100000001B3)
                           + np.uint64(crop_number))
        counters = keys[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _between(low, high, unit):
    return low + (high - low) * unit


def crop_windows(heights, widths, scale, ratio, area_draws, aspect_draws, top_draws, left_draws):
    """(B, 4) int (top, left, height, width): torchvision's RandomResizedCrop sampler, vectorised.

    *_draws are (B, CROP_TRIES) uniforms; the first try that fits the image wins, else a centre crop."""
    heights, widths = np.asarray(heights)[:, None], np.asarray(widths)[:, None]  # (B, 1)
    target_area = heights * widths * _between(scale[0], scale[1], area_draws)
    aspect = np.exp(_between(np.log(ratio[0]), np.log(ratio[1]), aspect_draws))
    crop_w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)  # (B, CROP_TRIES)
    crop_h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (crop_w > 0) & (crop_w <= widths) & (crop_h > 0) & (crop_h <= heights)
    top = np.floor(top_draws * (heights - crop_h + 1)).astype(np.int64)
    left = np.floor(left_draws * (widths - crop_w + 1)).astype(np.int64)
    first = fits.argmax(axis=1)  # the first try that fits
    rows = np.arange(len(first))
    window = np.stack([top[rows, first], left[rows, first], crop_h[rows, first], crop_w[rows, first]], axis=1)
    # No try fits: the largest centred crop whose aspect is within the range.
    heights, widths = heights[:, 0], widths[:, 0]
    image_aspect = widths / heights
    centre_w = np.where(image_aspect > ratio[1], np.rint(heights * ratio[1]), widths).astype(np.int64)
    centre_h = np.where(image_aspect < ratio[0], np.rint(widths / ratio[0]), heights).astype(np.int64)
    centre = np.stack([(heights - centre_h) // 2, (widths - centre_w) // 2, centre_h, centre_w], axis=1)
    return np.where(fits.any(axis=1)[:, None], window, centre)


def crop_parameters(crop, crop_number, sample_seeds, sizes_px):
    """(B, len(PARAMETERS)) float32: the window and every per-sample choice of one crop of a batch."""
    draws = uniforms(sample_seeds, crop_number, DRAWS_PER_CROP)
    tries = [draws[:, part * CROP_TRIES:(part + 1) * CROP_TRIES] for part in range(4)]
    single = {name: draws[:, 4 * CROP_TRIES + index] for index, name in enumerate(SINGLE_DRAWS)}
    heights, widths = zip(*sizes_px, strict=True)
    top, left, height, width = crop_windows(heights, widths, crop.scale, crop.ratio, *tries).T
    jitter = single["jitter"] < crop.jitter_prob

    def factor(spread, unit):  # torchvision's ColorJitter: U(max(0, 1 - s), 1 + s), 1 where no jitter
        return np.where(jitter, _between(max(0.0, 1 - spread), 1 + spread, unit), 1.0)

    keep_colour = single["grey"] >= crop.grayscale_prob
    columns = {
        "top": top, "left": left, "bottom": top + height, "right": left + width,
        "flip": single["flip"] < crop.flip_prob,
        "brightness": factor(crop.brightness, single["brightness"]),
        "contrast": factor(crop.contrast, single["contrast"]),
        "saturation": factor(crop.saturation, single["saturation"]) * keep_colour,  # 0 = grey
        "hue_degrees": np.where(jitter, _between(-crop.hue, crop.hue, single["hue"]) * 360, 0.0),
        "blur": single["blur"] < crop.blur_prob,
        "blur_sigma": _between(*crop.blur_sigma, single["sigma"]),
        "solarize": single["solarize"] < crop.solarize_prob,
    }
    return np.stack([np.asarray(columns[name], dtype=np.float32) for name in PARAMETERS], axis=1)


def enclosing_windows(windows, heights, widths, unit_draws):
    """(B, 4) int (top, left, height, width): a window holding every window of `windows` ((k, B, 4), same
    layout), its top and left uniform in [0, theirs], its bottom and right uniform in [theirs, the image's].
    unit_draws: (B, 4) uniforms."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    top, left = windows[..., 0].min(axis=0), windows[..., 1].min(axis=0)  # (B,)
    bottom = (windows[..., 0] + windows[..., 2]).max(axis=0)
    right = (windows[..., 1] + windows[..., 3]).max(axis=0)
    new_top = np.floor(unit_draws[:, 0] * (top + 1)).astype(np.int64)
    new_left = np.floor(unit_draws[:, 1] * (left + 1)).astype(np.int64)
    new_bottom = bottom + np.floor(unit_draws[:, 2] * (heights - bottom + 1)).astype(np.int64)
    new_right = right + np.floor(unit_draws[:, 3] * (widths - right + 1)).astype(np.int64)
    return np.stack([new_top, new_left, new_bottom - new_top, new_right - new_left], axis=1)


def windows_of(parameters):
    """(B, 4) int (top, left, height, width) from a (B, len(PARAMETERS)) crop parameter array."""
    top, left = parameters[:, COLUMN["top"]], parameters[:, COLUMN["left"]]
    return np.stack([top, left, parameters[:, COLUMN["bottom"]] - top, parameters[:, COLUMN["right"]] - left],
                    axis=1).astype(np.int64)


def plain_parameters(windows):
    """(B, len(PARAMETERS)) float32: `windows` with no flip and no colour change."""
    top, left, height, width = windows.T
    columns = {"top": top, "left": left, "bottom": top + height, "right": left + width, "brightness": 1.0,
               "contrast": 1.0, "saturation": 1.0, "blur_sigma": 1.0}
    return np.stack([np.broadcast_to(np.asarray(columns.get(name, 0.0), dtype=np.float32), top.shape)
                     for name in PARAMETERS], axis=1)


def enclosing_draws(sample_seeds, crop_number):
    """(B, 4) uniforms of an enclosing crop, keyed like every other crop's draws."""
    return uniforms(sample_seeds, crop_number, 4)


def recipe_parameters(recipe, sample_seeds, sizes_px):
    """[(B, len(PARAMETERS)) float32 per crop of `recipe.crops`]: every crop's window and per-sample choices."""
    heights, widths = zip(*sizes_px, strict=True)
    parameters = []
    for view in recipe.image_views.values():
        first = len(parameters)
        if isinstance(view, EnclosingCrop):
            around = np.stack([windows_of(parameters[number])
                               for number in range(len(parameters))[recipe.crop_slices[view.around]]])
            windows = enclosing_windows(around, heights, widths, enclosing_draws(sample_seeds, first))
            parameters.append(plain_parameters(windows))
            continue
        parameters += [crop_parameters(crop, first + index, sample_seeds, sizes_px)
                       for index, crop in enumerate(view.crops)]
    return parameters
