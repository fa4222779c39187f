"""Masks made on the training device: MLM caption masking and MAE patch removal."""

import torch

MASK_ID = 49408  # one past the CLIP BPE vocabulary (datapipe.text.MASK_ID; model/ does not import datapipe)


def _positions_and_eot(tokens):
    """(positions (1, T), EOT position of each row (B, 1)); EOT is the largest id in a row."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    return positions, tokens.argmax(dim=-1, keepdim=True)


def real_token_mask(tokens):
    """(B, T) bool: True from SOT up to and including EOT."""
    positions, eot_position = _positions_and_eot(tokens)
    return positions <= eot_position


def mask_captions(tokens, probability=0.2, generator=None):
    """BERT-style masking without the 80/10/10 rule, as the official code.

    Each position is masked with `probability`, except SOT (position 0), EOT and padding.
    Returns (masked token ids, labels with the original ids at masked positions and -100
    elsewhere, the (B, T) bool mask).
    """
    draws = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    positions, eot_position = _positions_and_eot(tokens)
    maskable = (positions > 0) & (positions < eot_position)
    masked = (draws < probability) & maskable
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return torch.where(masked, torch.full_like(tokens, MASK_ID), tokens), labels, masked


def random_keep_indices(batch, num_patches, mask_ratio, device=None, generator=None):
    """MAE per-sample random masking: (keep (B, n_keep) patch indices, removed (B, N) bool).

    n_keep = int(N * (1 - mask_ratio)), as the official code (49 of 196 at 0.75)."""
    num_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    removed = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    removed.scatter_(1, keep, False)
    return keep, removed
