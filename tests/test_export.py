"""Exports load in timm and open_clip, unchanged, and give our towers' features through their own transforms."""

import dataclasses

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import fake_run
from PIL import Image

from tools import export
from tools.eval.datasets import TEMPLATE_SETS, open_eval_set
from tools.eval.towers import RunTowers
from tools.eval.zeroshot import zero_shot
from tools.export import export_open_clip, export_timm
from train.config import load_config

SIZES = [dict(vit_size="micro", patch_size=8, global_crop_px=64), dict(vit_size="tiny")]


def photo(width_px=150, height_px=110, seed=0):
    """A non-square image, so that resizing and centre-cropping matter."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height_px, width_px, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: size["vit_size"])
def test_timm_own_transform_and_model_give_our_features(tmp_path, size):
    run = fake_run(tmp_path, **size)
    out = export_timm(run, tmp_path / "timm")
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=exported)
    assert data_config["input_size"] == (3, size.get("global_crop_px", 224), size.get("global_crop_px", 224))
    transform = timm.data.create_transform(**data_config)
    towers = RunTowers(run)
    images = [photo(seed=0), photo(90, 200, seed=1)]
    ours = towers.image_features(images)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images])
        embedding = exported(pixels)  # the head is the CLIP projection
        cls = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()(pixels)
    torch.testing.assert_close(F.normalize(embedding, dim=-1), ours["embedding"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, ours["cls"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: size["vit_size"])
def test_open_clip_loads_both_towers_with_the_same_embeddings(tmp_path, size):
    run = fake_run(tmp_path, **size)
    out = export_open_clip(run, tmp_path / "open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    towers = RunTowers(run)
    images = [photo(seed=2), photo(80, 120, seed=3)]
    tokens = tokenizer(["a red circle", "two blue squares on a striped table"])
    with torch.no_grad():
        image_embedding = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
        text_embedding = model.encode_text(tokens)
        ours_text = towers.text(tokens)[0]
    torch.testing.assert_close(image_embedding, towers.image_features(images)["embedding"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_embedding, ours_text, rtol=1e-4, atol=1e-5)


def test_open_clip_zero_shot_equals_ours_on_the_demo_model(tmp_path, demo_shards):
    """The demo preset's micro ViT, scored through open_clip alone: model, transforms and tokenizer."""
    run = fake_run(tmp_path, **dataclasses.asdict(load_config("demo").model))
    out = export_open_clip(run, tmp_path / "open_clip")
    ours = zero_shot(RunTowers(run), demo_shards["heldout"])

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    heldout = open_eval_set(demo_shards["heldout"])
    samples, names = list(heldout.samples()), heldout.class_names
    with torch.no_grad():
        prompts = [F.normalize(model.encode_text(tokenizer([t.format(name) for t in TEMPLATE_SETS["simple"]])),
                               dim=-1) for name in names]
        classifier = F.normalize(torch.stack([embeddings.mean(dim=0) for embeddings in prompts]), dim=-1)
        images = torch.stack([preprocess(Image.open(path)) for path, _ in samples])
        predictions = (model.encode_image(images, normalize=True) @ classifier.T).argmax(dim=1)
    labels = torch.tensor([label for _, label in samples])
    assert float((predictions == labels).float().mean()) == pytest.approx(ours["top1"], abs=1e-4)
    per_class = {name: float((predictions[labels == index] == index).float().mean()) for index, name in
                 enumerate(names)}
    assert per_class == pytest.approx(ours["per_class_top1"], abs=1e-4)



@pytest.mark.parametrize("target", ["timm", "open_clip"])
def test_a_run_pooled_otherwise_than_cls_is_refused_with_the_reason(tmp_path, target):
    run = fake_run(tmp_path, vit_size="micro", patch_size=16, global_crop_px=32, clip_pooling="gap")
    with pytest.raises(SystemExit, match="pools its tokens by 'gap'"):
        export.main([target, "--run", str(run), "--out", str(tmp_path / "out")])
