"""The recipe a config names (data.views), the check that it makes what the objectives read, and the step's
inputs by name."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datapipe.load.batch import Batch, assemble, longest_caption
from train.config import load_config
from train.step_inputs import made_views, model_views, view_recipe


@pytest.mark.parametrize("views, missing", [("clip_rocket", "['global_crops', 'local_crops', 'tokens']"),
                                            ("aclip", "['global_crops', 'local_crops']")])
def test_a_recipe_without_the_views_the_objectives_read_is_refused_before_training(views, missing):
    with pytest.raises(ValueError) as refused:
        load_config("harmony/demo", [f"data.views={views}"])
    assert f"also read {missing}: choose the data.views recipe" in str(refused.value)


def test_an_unknown_recipe_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="data.views='simclr': choose one of auto, slip, clip_rocket, aclip$"):
        load_config("clip/demo", ["data.views=simclr"])


def test_slip_recipe_gives_the_clip_objective_its_view():
    recipe = view_recipe(load_config("clip/demo", ["data.views=slip"]))
    assert {"global_crops", "simclr", "tokens"} <= set(made_views(recipe))


@pytest.mark.parametrize("preset, flip", [("clip/demo", 0.0), ("siglip/demo", 0.0), ("maskclip/demo", 0.0),
                                          ("detailclip/demo", 0.0), ("m3ae/demo", 0.5), ("harmony/demo", 0.5)])
def test_flip_of_each_method_view(preset, flip):
    recipe = view_recipe(load_config(preset))
    assert {crop.flip_prob for crop in recipe.image_views["global_crops"].crops} == {flip}


def caption_tokens(lengths):
    tokens = torch.zeros(len(lengths), 77, dtype=torch.long)  # (B, 77)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, 1:length - 1], tokens[row, length - 1] = 49406, 320, 49407
    return tokens


def test_model_views_names_every_view_and_cuts_text_to_its_longest_caption():
    batch = Batch(images={"weak": torch.zeros(1, 2, 3, 8, 8), "strong": torch.zeros(2, 2, 3, 8, 8)},
                  texts={"weak_text": caption_tokens([5, 9])[None],
                         "strong_text": torch.stack([caption_tokens([20, 3]), caption_tokens([4, 4])])},
                  masks={}, boxes={"strong": torch.ones(2, 2, 4)}, keys=["a", "b"])
    views = model_views(batch, trim=True)
    assert sorted(views) == ["strong", "strong_boxes", "strong_text", "weak", "weak_text"]
    assert views["weak_text"].shape == (1, 2, 16) and views["strong_text"].shape == (2, 2, 32)
    assert model_views(batch, trim=False)["strong_text"].shape == (2, 2, 77)


def test_the_caption_lengths_the_loader_counts_on_the_host_cut_as_the_device_read(monkeypatch):
    """The loader's count (before the copy) gives the same cut as reading the tokens, and the step then reads
    nothing back from the device."""
    texts = {"caption": caption_tokens([5, 20, 9])[None].numpy()}  # (1, B, 77)
    raw = SimpleNamespace(texts=texts, masks={}, keys=["a", "b", "c"], skipped=[])
    recipe = view_recipe(load_config("clip/demo"))
    crops = [torch.zeros(3, 3, 8, 8)]
    batch = assemble(crops, [np.zeros((3, 4))], raw, recipe, torch.float32)
    assert batch.caption_lengths == {"caption": 20} and longest_caption(np.zeros((2, 77))) == 0
    read_on_device = model_views(replace(batch, caption_lengths={}), trim=True)["caption"]
    monkeypatch.setattr(torch.Tensor, "__int__", lambda _: pytest.fail("the step read a caption length back"))
    assert torch.equal(model_views(batch.to("cpu"), trim=True)["caption"], read_on_device)
    assert read_on_device.shape == (1, 3, 32)


def test_model_views_of_a_single_crop_recipe_give_the_harmony_names():
    batch = Batch(images={"global_crops": torch.zeros(1, 2, 3, 8, 8)}, texts={"caption": caption_tokens([5, 7])[None]},
                  masks={}, boxes={}, keys=["a", "b"])
    views = model_views(batch, trim=True)
    assert views["tokens"].shape == (2, 16) and views["local_crops"].shape == (0, 2, 3, 0, 0)
    assert views["ibot_masks"].shape == (0, 2, 0, 0)


@pytest.mark.parametrize("preset, hue, grey", [("slip/demo", 0.0, 0.0), ("aclip/demo", 0.0, 0.0),
                                               ("clip_rocket/demo", 0.0, 0.0), ("slip/cc3m", 0.1, 0.2),
                                               ("clip_rocket/cc3m", 0.1, 0.2)])
def test_a_methods_own_recipe_takes_the_configured_colour(preset, hue, grey):
    """The demo's classes are colours: its presets turn hue jitter and grey off in every recipe's jittered crops;
    the cc3m presets keep the recipes' 0.1 and 0.2."""
    recipe = view_recipe(load_config(preset))
    jittered = [crop for view in recipe.image_views.values() for crop in view.crops if crop.jitter_prob]
    assert jittered and {(crop.hue, crop.grayscale_prob) for crop in jittered} == {(hue, grey)}
    plain = [crop for view in recipe.image_views.values() for crop in view.crops if not crop.jitter_prob]
    assert plain and all(crop.grayscale_prob == 0 for crop in plain)
