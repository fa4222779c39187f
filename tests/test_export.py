"""Exports load in timm and open_clip, unchanged, and give our towers' features through their own transforms."""

import dataclasses
import math

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import SMALL_TEXT, fake_run
from PIL import Image

import export.weights
from evaluation.datasets import TEMPLATE_SETS, open_eval_set
from evaluation.towers import RunTowers
from evaluation.zeroshot import zero_shot
from export.weights import export_open_clip, export_timm
from model.meta_arch import MetaArch
from train import checkpoint, presets
from train.config import load_config
from train.pretrain import TEACHER_WEIGHTS, save_teacher_weights

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
    demo = load_config("harmony/demo").model
    towers = {field.name: getattr(demo, field.name) for field in dataclasses.fields(demo) if field.name != "objectives"}
    run = fake_run(tmp_path, objectives=demo.objectives, **towers)
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
        export.weights.main([target, "--run", str(run), "--out", str(tmp_path / "out")])


NO_CONTRASTIVE_LOSS = ("m3ae/demo",)  # exported to timm (headless), refused by open_clip
OPEN_CLIP_PRESETS = [preset for preset in presets.discover("demo").values() if preset not in NO_CONTRASTIVE_LOSS
                     and load_config(preset).model.clip_pooling == "cls"]  # other poolings are refused


LOGIT_SCALE, LOGIT_BIAS = 23.0, -3.5  # neither open_clip's nor our presets' initial values


def tiny_preset_run(tmp_path, preset):
    """A run folder of `preset`'s model, shrunk, untrained, with teachers, logit scale and bias (where it has one)
    away from their initial values: what train.pretrain leaves, without training."""
    model_config = dataclasses.replace(load_config(preset).model, **SMALL_TEXT, patch_size=8, global_crop_px=32)
    torch.manual_seed(0)
    model = MetaArch(model_config)
    with torch.no_grad():
        for param in model.teachers.parameters():
            param.add_(0.01 * torch.randn_like(param))
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(math.log(LOGIT_SCALE))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(LOGIT_BIAS)
    save_teacher_weights(model, tmp_path / TEACHER_WEIGHTS)
    return tmp_path, model


def test_every_exported_preset_is_listed():
    assert {"clip/demo", "siglip/demo", "harmony/demo", "aclip/demo", "clip_rocket/demo"} <= set(OPEN_CLIP_PRESETS)


@pytest.mark.parametrize("preset", OPEN_CLIP_PRESETS)
def test_open_clip_alone_gives_our_logits_with_scale_and_bias(tmp_path, preset):
    """open_clip's get_logits equals exp(logit scale) x our cosine similarities (+ SigLIP's bias)."""
    run, model = tiny_preset_run(tmp_path, preset)
    out = export_open_clip(run, tmp_path / "open_clip")
    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    exported.eval()
    towers = RunTowers(run, device="cpu")
    images = [photo(seed=4), photo(70, 90, seed=5)]
    tokens = tokenizer(["a red circle", "two blue squares", "a striped table"])
    with torch.no_grad():
        theirs, _ = exported.get_logits(torch.stack([preprocess(image) for image in images]), tokens)
        similarity = towers.image_features(images)["embedding"] @ F.normalize(towers.text(tokens)[0], dim=-1).T
    siglip = preset == "siglip/demo"
    assert hasattr(model, "logit_bias") == siglip and (exported.logit_bias is not None) == siglip
    torch.testing.assert_close(theirs, LOGIT_SCALE * similarity + (LOGIT_BIAS if siglip else 0.0), rtol=1e-4,
                               atol=1e-4)


def test_a_siglip_teacher_weights_file_without_its_bias_takes_it_from_the_checkpoint(tmp_path):
    """teacher_weights.pt written before it held the bias: the newest checkpoint's, else a one-line refusal."""
    run, _ = tiny_preset_run(tmp_path, "siglip/demo")
    weights = torch.load(run / TEACHER_WEIGHTS, weights_only=True)
    del weights["logit_bias"]
    torch.save(weights, run / TEACHER_WEIGHTS)
    with pytest.raises(SystemExit, match=r"teacher_weights.pt has no logit bias .* no checkpoint in .* holds one"):
        export.weights.main(["open_clip", "--run", str(run), "--out", str(tmp_path / "refused")])
    saved = {"model": {"logit_bias": torch.tensor(-2.5)}}
    checkpoint.save_atomic(saved, run / "checkpoints" / "checkpoint-00000001.pt")
    out = export_open_clip(run, tmp_path / "open_clip")
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert exported.logit_bias.item() == -2.5


def test_a_run_without_a_contrastive_loss_is_refused_by_open_clip_and_exported_headless_to_timm(tmp_path, capsys):
    """M3AE trains no CLIP projection: open_clip's export says so and points at timm, whose model gives the CLS."""
    run, _ = tiny_preset_run(tmp_path, "m3ae/demo")
    with pytest.raises(SystemExit) as refused:
        export.weights.main(["open_clip", "--run", str(run), "--out", str(tmp_path / "open_clip")])
    assert str(refused.value) == (
        "this run trained no contrastive loss (its objectives: multimodal_mae), so its CLIP projections and logit "
        "scale are untrained and an open_clip model of it would score images against texts at random; export its "
        "image tower with `python -m export timm` instead (its output is the CLS token)")
    assert not (tmp_path / "open_clip").exists()
    export.weights.main(["timm", "--run", str(run), "--out", str(tmp_path / "timm")])
    assert "its CLIP projection is untrained and left out: the exported model's output is the CLS token" in \
        capsys.readouterr().out
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=exported))
    images = [photo(seed=6)]
    with torch.no_grad():
        cls = exported(torch.stack([transform(image) for image in images]))
    torch.testing.assert_close(cls, RunTowers(run, device="cpu").image_features(images)["cls"], rtol=1e-4, atol=1e-5)
