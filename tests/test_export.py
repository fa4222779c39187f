"""Export round trips: timm loads the image tower, open_clip loads both towers, with identical embeddings."""

import open_clip
import pytest
import timm
import torch
from conftest import fake_run

from tools.eval.towers import load_towers
from tools.export import export_open_clip, export_timm


def test_timm_loads_the_exported_image_tower(tmp_path):
    run = fake_run(tmp_path, vit_size="micro", patch_size=8, global_crop_px=64)
    path, name, kwargs = export_timm(run, tmp_path / "timm")
    exported = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
                                 **kwargs).eval()
    ours, _, _ = load_towers(run)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.forward_features(images), ours(images))


def test_open_clip_loads_both_towers_with_the_same_embeddings(tmp_path):
    run = fake_run(tmp_path, vit_size="tiny")
    out = export_open_clip(run, tmp_path / "open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    image_tower, text_tower, _ = load_towers(run)
    images = torch.randn(2, 3, 224, 224)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, :4] = torch.tensor([49406, 320, 1125, 49407])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), image_tower.embed_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), text_tower(tokens)[0], rtol=1e-4, atol=1e-5)
    assert preprocess.transforms[-1].mean == pytest.approx((0.485, 0.456, 0.406))


def test_open_clip_export_explains_unsupported_sizes(tmp_path):
    run = fake_run(tmp_path, vit_size="micro", patch_size=8, global_crop_px=64)
    with pytest.raises(ValueError, match="Export to timm"):
        export_open_clip(run, tmp_path / "open_clip")
