"""M3AE's masking and text loss against its official code (young-geng/m3ae_public): the formulas written out here
in the official code's terms, on identical tensors."""

import pytest
import torch
import torch.nn.functional as F
from test_harmony import tiny_batch
from tiny_models import tiny_preset_config

from model import losses
from model.masking import MASK_ID, batch_keep_indices, mask_captions_by_count, real_token_mask
from model.meta_arch import MetaArch


def official_text_loss(logits, tokens, valid):
    """m3ae cross_entropy_loss_and_accuracy: per caption, the summed log-probability of its valid (masked, not
    padding) tokens over max(their count, 1e-5); then minus the mean over captions."""
    valid = valid.float()
    token_log_prob = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens[..., None])[..., 0]  # (B, T)
    token_log_prob = torch.where(valid > 0, token_log_prob, torch.zeros_like(token_log_prob))
    return -(token_log_prob.sum(-1) / valid.sum(-1).clamp(min=1e-5)).mean()


def captions_and_mask():
    """(tokens (4, 12), masked (4, 12)): captions of 3 to 10 tokens; caption 2 has no masked token."""
    tokens = torch.zeros(4, 12, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for row, length in enumerate((10, 6, 3, 8)):
        tokens[row, :length] = torch.randint(1, 50, (length,), generator=generator)
    masked = (torch.rand(4, 12, generator=generator) < 0.6) & (tokens > 0)
    masked[2] = False
    masked[0, 1] = True
    return tokens, masked


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_text_loss_is_each_captions_mean_then_the_mean_over_captions(chunks):
    """Value and every gradient equal the official loss, with a caption that has no masked token (it counts 0);
    the batch-wide mean over masked tokens is a different number."""
    tokens, masked = captions_and_mask()
    torch.manual_seed(1)
    predict = torch.nn.Linear(8, 50)
    states = torch.randn(4, 12, 8, requires_grad=True)
    expected = official_text_loss(predict(states), tokens, masked)
    expected_grads = torch.autograd.grad(expected, [states, predict.weight, predict.bias])
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    loss, _ = losses.mlm_loss(states[masked], labels[masked], predict, chunks,
                              row_weights=losses.per_caption_weights(masked))
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(torch.autograd.grad(loss, [states, predict.weight, predict.bias]), expected_grads,
                                   strict=True):
        torch.testing.assert_close(grad, expected_grad)
    batch_mean, _ = losses.mlm_loss(states[masked], labels[masked], predict, chunks)
    assert abs(batch_mean.item() - loss.item()) > 1e-3


def test_masking_is_one_permutation_per_batch_with_a_fixed_count():
    """m3ae random_masking: noise of shape (length,), so every sample keeps the same int(length * (1 - ratio))
    positions; captions over their padded length, only real tokens labelled."""
    keep, removed = batch_keep_indices(5, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (5, 49) and (keep == keep[:1]).all() and (removed == removed[:1]).all()
    assert removed.sum(dim=1).tolist() == [147] * 5
    assert not removed.gather(1, keep).any()

    tokens = tiny_batch(batch=4)["tokens"][:, :20]  # (4, 20): captions of 7 to 10 tokens, then padding
    masked_tokens, labels, masked = mask_captions_by_count(tokens, 0.75, torch.Generator().manual_seed(1))
    _, removed = batch_keep_indices(4, 20, 0.75, generator=torch.Generator().manual_seed(1))
    assert removed.sum(dim=1).tolist() == [20 - int(20 * 0.25)] * 4
    assert torch.equal(masked, removed & real_token_mask(tokens))
    assert torch.equal(masked_tokens[masked], torch.full((int(masked.sum()),), MASK_ID))
    assert torch.equal(masked_tokens[~masked], tokens[~masked])
    assert torch.equal(labels[masked], tokens[masked]) and (labels[~masked] == -100).all()


def test_the_objective_reports_the_official_text_loss_on_its_own_outputs():
    """The M3AE preset's pass: its text metric equals the official loss on the decoder's outputs for the same masks
    (drawn again from the same seed), its image metric the mean over removed patches."""
    config = tiny_preset_config("m3ae/demo")  # its decoder at tiny_models.TINY_SETTINGS' width 32, depth 1, 4 heads
    assert not config.objectives["multimodal_mae"].norm_pix  # the image metric below reads raw pixels
    torch.manual_seed(0)
    model = MetaArch(config)
    batch = tiny_batch(batch=4)
    views = {"global_crops": batch["global_crops"][:1], "tokens": batch["tokens"][:, :16]}
    torch.manual_seed(5)
    (_, metrics), = model.group_passes("multimodal_mae", views, teacher={})
    crop, tokens = views["global_crops"][0], views["tokens"]
    torch.manual_seed(5)
    keep, removed = batch_keep_indices(4, 16, 0.75)  # (32 / 8)^2 = 16 patches
    masked_tokens, _, masked = mask_captions_by_count(tokens, 0.75)
    with torch.no_grad():
        pixels, words = model.multimodal_decoder(model.image_student(crop, keep_indices=keep), keep, 16,
                                                 model.text_student(masked_tokens)[1], real_token_mask(tokens))
        expected_text = official_text_loss(model.multimodal_decoder.predict(words), tokens, masked)
        expected_image, _ = losses.mae_loss(pixels, crop, removed, 8, norm_pix=False)
    torch.testing.assert_close(metrics["multimodal_text"], expected_text)
    torch.testing.assert_close(metrics["multimodal_image"], expected_image)
