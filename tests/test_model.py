"""Networks: sizes, timm compatibility, iBOT masking, MAE token dropping, causality, precision."""

import math

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from model.decoders import MAEDecoder, MLMDecoder
from model.heads import ibot_head, text_distillation_head
from model.masking import MASK_ID, random_keep_indices
from model.text_tower import TextEncoder
from model.vit import VisionTransformer, export_timm_state_dict

torch.manual_seed(0)


def millions(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only) / 1e6


@pytest.mark.parametrize("build, expected_millions", [
    (lambda: VisionTransformer("base"), 86.2),
    (lambda: ibot_head(768), 8.4),
    (lambda: TextEncoder(), 63.4),
    (lambda: MLMDecoder(MASK_ID + 1), 38.0),
    (lambda: MAEDecoder(768, (14, 14)), 26.0),
    # docs/methods/harmony.md rounds it to 1.3M; written out: 512*1024+1024 + 1024*256+256 + 256*2048 + 2048 (norm)
    (lambda: text_distillation_head(), 1.314048),
])
def test_parameter_counts_match_harmony_md(build, expected_millions):
    assert millions(build()) == pytest.approx(expected_millions, rel=0.01)


def test_vit_small_is_timm_small_plus_projection_and_mask_token():
    timm_small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert millions(VisionTransformer("small")) * 1e6 == millions(timm_small) * 1e6 + 384 * 512 + 384


def test_image_tower_exports_to_timm_with_identical_features():
    ours = VisionTransformer("tiny").eval()
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(export_timm_state_dict(ours), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference.forward_features(images))


def test_ibot_mask_replaces_patch_content():
    vit = VisionTransformer("micro", patch_size=8, img_size=64).eval()
    full_mask = torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        first = vit(torch.randn(2, 3, 64, 64), patch_mask=full_mask)
        second = vit(torch.randn(2, 3, 64, 64), patch_mask=full_mask)
        unmasked = vit(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(first, second)  # nothing of the image is left
    assert not torch.allclose(first, unmasked)


def test_local_crops_and_mae_token_dropping():
    vit = VisionTransformer("micro", patch_size=8, img_size=64)
    assert vit(torch.randn(3, 3, 32, 32)).shape == (3, 1 + 16, 96)  # local crop: 4x4 patches
    keep, removed = random_keep_indices(3, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 16) and removed.sum(1).tolist() == [48, 48, 48]
    assert not removed.gather(1, keep).any()
    assert vit(torch.randn(3, 3, 64, 64), keep_indices=keep).shape == (3, 1 + 16, 96)


def test_mae_keeps_int_of_unmasked_share():
    keep, _ = random_keep_indices(2, 196, 0.75)
    assert keep.shape[1] == 49


def test_mae_decoder_knows_positions():
    """With identical inputs at every removed position, predictions still differ by position
    (the official code's zero position embedding made them identical)."""
    decoder = MAEDecoder(96, (4, 4), patch_size=8, width=64, depth=2, num_heads=4).eval()
    keep = torch.tensor([[0, 5]])
    with torch.no_grad():
        predictions = decoder(torch.randn(1, 3, 96), keep, 16)
    assert predictions.shape == (1, 16, 8 * 8 * 3)
    assert not torch.allclose(predictions[0, 1], predictions[0, 2], atol=1e-4)


def test_text_encoder_is_causal_and_pools_eot():
    encoder = TextEncoder(width=64, layers=2, heads=4, clip_dim=32).eval()
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :6] = torch.tensor([49406, 320, 1746, 2866, 3175, 49407])
    changed = tokens.clone()
    changed[0, 3] = 999
    with torch.no_grad():
        embedding, features = encoder(tokens)
        _, changed_features = encoder(changed)
    assert embedding.shape == (1, 32) and features.shape == (1, 77, 64)
    torch.testing.assert_close(features[:, :3], changed_features[:, :3])  # earlier positions unaffected
    assert not torch.allclose(features[:, 3:6], changed_features[:, 3:6])


def test_mlm_decoder_is_causal():
    decoder = MLMDecoder(vocab_size=50, width=32, depth=1, heads=4).eval()
    features = torch.randn(1, 77, 32)
    changed = features.clone()
    changed[0, 10] += 1
    with torch.no_grad():
        torch.testing.assert_close(decoder(features)[:, :10], decoder(changed)[:, :10])


def test_heads_output_shapes_and_frozen_norm():
    head = ibot_head(96, out_dim=512)
    assert head(torch.randn(4, 5, 96)).shape == (4, 5, 512)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    assert text_distillation_head(64, 128)(torch.randn(2, 77, 64)).shape == (2, 77, 128)


def test_forward_under_bf16_autocast():
    vit = VisionTransformer("micro", patch_size=8, img_size=64)
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = vit(images)  # the final LayerNorm runs in fp32 under autocast, the blocks in bf16
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens, vit(images), atol=0.1, rtol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_student_matches_eager_on_gpu():
    vit = VisionTransformer("micro", patch_size=8, img_size=64).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(torch.compile(vit)(images), vit(images), atol=2e-2, rtol=2e-2)


def bicubic_weights(in_size, out_size, scale):
    """(out_size, in_size) matrix of PyTorch's bicubic resize (A = -0.75, align_corners=False, edges clamped,
    no antialias) sampling with the given scale factor, written out."""
    def cubic(distance):
        distance, a = abs(distance), -0.75
        if distance <= 1:
            return (a + 2) * distance ** 3 - (a + 3) * distance ** 2 + 1
        if distance < 2:
            return a * distance ** 3 - 5 * a * distance ** 2 + 8 * a * distance - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        source = (out + 0.5) / scale - 0.5
        first = math.floor(source)
        for tap in range(first - 1, first + 3):
            weights[out, min(max(tap, 0), in_size - 1)] += cubic(source - tap)
    return weights


def test_local_crop_positions_are_resized_as_the_official_code():
    """DINO's interpolate_pos_encoding: bicubic with scale (6 + 0.1) / 14 for 96-px crops of a 224-px ViT/16."""
    vit = VisionTransformer("micro", 16, 224)
    table = vit.pos_embed.detach()[0, 1:].reshape(14, 14, -1).double().numpy()  # (rows, cols, D)
    weights = bicubic_weights(14, 6, 6.1 / 14)
    expected = np.einsum("ir,jc,rcd->ijd", weights, weights, table).reshape(36, -1)
    with torch.no_grad():
        ours = vit.position_embedding((6, 6))[0]
    assert ours.shape == (37, vit.embed_dim)
    torch.testing.assert_close(ours[0], vit.pos_embed[0, 0])  # CLS position unchanged
    np.testing.assert_allclose(ours[1:].numpy(), expected, rtol=1e-5, atol=1e-6)
    # timm's resize (exact size, antialias) is measurably different on a smooth table
    smooth = torch.linspace(0, 1, 14)
    vit.pos_embed.data[0, 1:] = (smooth[:, None] * smooth[None, :]).reshape(196, 1)
    with torch.no_grad():
        timm_table = resample_abs_pos_embed(vit.pos_embed, [6, 6], [14, 14], num_prefix_tokens=1)
        difference = (vit.position_embedding((6, 6)) - timm_table)[0, 1:].norm() / timm_table[0, 1:].norm()
    assert difference > 0.01
