"""The data recipe a config asks for, and the step's inputs by name for the objectives.

`data.views` names the recipe: `auto` is Harmony's multi-crop, or one CLIP crop when no objective reads more (the sizes,
scales and colour of the `data.*` crop fields); `slip`, `clip_rocket` and `aclip` are the recipes of
docs/methods/README.md section 3 (datapipe/load/recipes.py) at `data.global_crop_px`, with `data.hue` and
`data.grayscale_prob`. `check_views` fails before training when the recipe lacks a view an enabled objective reads.
"""

import dataclasses

from datapipe.load.recipes import CAPTION, ImageView, MultiCrop, SingleCrop, aclip_views, clip_rocket_views, slip_views
from model.text_tower import trim_padding

RECIPES = {"slip": slip_views, "clip_rocket": clip_rocket_views, "aclip": aclip_views}
VIEW_CHOICES = ("auto", *RECIPES)


def view_recipe(config):
    """The recipe of `config.data.views`; for `auto`, MultiCrop's defaults except the configured fields."""
    data = config.data
    if data.views != "auto":
        return with_colour(RECIPES[data.views](size_px=data.global_crop_px), data.hue, data.grayscale_prob)
    if data.local_crops_number == 0 and config.model.global_views == 1:
        return SingleCrop(size_px=data.global_crop_px, scale=data.global_crop_scale, flip_prob=data.global_flip_prob)
    defaults = MultiCrop()
    colour = dict(hue=data.hue, grayscale_prob=data.grayscale_prob)
    global_crop = dict(size_px=data.global_crop_px, scale=data.global_crop_scale, flip_prob=data.global_flip_prob,
                       **colour)
    local_crop = dict(size_px=data.local_crop_px, scale=data.local_crop_scale, **colour)
    return MultiCrop(global_1=dataclasses.replace(defaults.global_1, **global_crop),
                     global_2=dataclasses.replace(defaults.global_2, **global_crop),
                     local=dataclasses.replace(defaults.local, **local_crop),
                     local_crops_number=data.local_crops_number, patch_size=config.model.patch_size)


def with_colour(recipe, hue, grayscale_prob):
    """`recipe` with the hue range of its colour-jittered crops and the grey probability of its greyed crops set
    to the configured ones (the recipes' own are the data fields' defaults, 0.1 and 0.2; the demo's classes are
    colours, so its presets turn both off)."""
    def recoloured(crop):
        return dataclasses.replace(crop, hue=hue if crop.jitter_prob else crop.hue,
                                   grayscale_prob=grayscale_prob if crop.grayscale_prob else 0.0)

    views = {name: dataclasses.replace(view, crops=tuple(map(recoloured, view.crops))) if isinstance(view, ImageView)
             else view for name, view in recipe.image_views.items()}
    return dataclasses.replace(recipe, image_views=views)


def made_views(recipe):
    """The names `model_views` gives the objectives for `recipe`."""
    names = [*recipe.image_views, *recipe.text_views]
    names += [f"{name}_boxes" for name, view in recipe.image_views.items() if view.boxes]
    if "global_crops" in recipe.image_views:
        names += ["local_crops", "ibot_masks"]
    if CAPTION in recipe.text_views:
        names.append("tokens")
    return names


def check_views(config, reads):
    """ValueError naming the views the enabled objectives (`reads`) need and `data.views` does not make."""
    made = made_views(view_recipe(config))
    missing = [name for name in dict.fromkeys(reads) if name not in made]
    if missing:
        raise ValueError(f"data.views={config.data.views} makes the views {made}, but the enabled objectives also "
                         f"read {missing}: choose the data.views recipe their method uses ({', '.join(VIEW_CHOICES)})")


def model_views(batch, trim):
    """A Batch as the objectives read it: each image view (n, B, 3, H, W) and text view (n, B, T) by name,
    `<view>_boxes` (n, B, 4); with a `global_crops` view also `local_crops` and `ibot_masks`, and `tokens` (B, T)
    for the one caption. trim: cut text views to their longest caption (train only what the text tower reads),
    at the length the loader counted on the host (Batch.caption_lengths): the step does not wait to read it."""
    views = dict(batch.images)
    for name, tokens in batch.texts.items():
        views[name] = trim_padding(tokens, longest=batch.caption_lengths.get(name)) if trim else tokens
    views.update((f"{name}_boxes", boxes) for name, boxes in batch.boxes.items())
    if "global_crops" in batch.images:
        views["local_crops"], views["ibot_masks"] = batch.local_crops, batch.ibot_masks
    if CAPTION in batch.texts:
        views["tokens"] = views[CAPTION][0]
    return views
