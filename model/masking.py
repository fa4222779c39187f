"""Masks made on the training device: MLM caption masking, MAE patch removal, attention-guided patch removal (and
A-CLIP's mapping of a zoom-out view's attention onto the crops it encloses)."""

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

MASK_ID = 49408  # one past the CLIP BPE vocabulary (datapipe.common.captions.MASK_ID; model/ does not import datapipe)


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


def batch_keep_indices(batch, length, mask_ratio, device=None, generator=None):
    """M3AE's masking: one random permutation for the whole batch, so every sample keeps the same positions.
    Returns (keep (B, n_keep) sorted indices, removed (B, length) bool), as random_keep_indices, with
    n_keep = int(length * (1 - mask_ratio))."""
    num_keep = int(length * (1 - mask_ratio))
    keep = torch.rand(length, device=device, generator=generator).argsort()[:num_keep].sort().values  # (n_keep,)
    removed = torch.ones(length, dtype=torch.bool, device=device)
    removed[keep] = False
    return keep[None].repeat(batch, 1), removed[None].repeat(batch, 1)


def mask_captions_by_count(tokens, mask_ratio, generator=None):
    """M3AE's caption masking: one permutation of the T positions (the padded length) for the whole batch keeps
    int(T * (1 - mask_ratio)) of them; the other positions are masked where they hold a real token (SOT..EOT,
    either end included), replaced by [MASK] and predicted. Padding is never a label.
    Returns (masked token ids, labels with the original ids at masked positions and -100 elsewhere, (B, T) bool),
    as mask_captions."""
    _, removed = batch_keep_indices(tokens.shape[0], tokens.shape[1], mask_ratio, tokens.device, generator)
    masked = removed & real_token_mask(tokens)
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return torch.where(masked, torch.full_like(tokens, MASK_ID), tokens), labels, masked


def attentive_keep_indices(attention, grid, mask_ratio=0.5):
    """A-CLIP's and DetailCLIP's attention-guided removal in 2x2 blocks of patches (docs/methods/aclip.md and
    docs/methods/detailclip.md).

    attention: (B, rows*cols) an EMA teacher's CLS attention to each patch. It is averaged over 2x2 blocks (what
    their bilinear resize to half the grid computes), the int(blocks * (1 - mask_ratio)) + 1 highest blocks are kept
    (25 of 49 at 0.5: 100 of 196 patches) with their 4 patches each. Returns (keep (B, n_keep) sorted patch indices,
    removed (B, N) bool), as random_keep_indices."""
    rows, cols = grid
    batch = attention.shape[0]
    blocks = F.avg_pool2d(attention.reshape(batch, 1, rows, cols).float(), 2).flatten(1)  # (B, rows/2 * cols/2)
    kept_blocks = blocks.topk(min(int(blocks.shape[1] * (1 - mask_ratio)) + 1, blocks.shape[1]), dim=1).indices
    block_row, block_col = kept_blocks // (cols // 2), kept_blocks % (cols // 2)  # (B, kept blocks)
    offsets = torch.tensor([0, 1, cols, cols + 1], device=attention.device)  # the 4 patches of a block
    keep = ((2 * block_row * cols + 2 * block_col)[..., None] + offsets).flatten(1).sort(dim=1).values
    removed = torch.ones(batch, rows * cols, dtype=torch.bool, device=attention.device)
    removed.scatter_(1, keep, False)
    return keep, removed


def attention_in_boxes(attention, grid, enclosing_box, boxes):
    """A-CLIP's attention for each online crop, from the teacher's attention on the zoom-out crop
    (docs/methods/aclip.md): the part of the enclosing crop's attention map that each online box covers, resized back to
    the grid (bilinear samples at the bin centres, as their resize to the crop's pixels, crop and resize back).

    attention: (B, rows*cols) on the enclosing crop; enclosing_box: (B, 4) and boxes: (V, B, 4), (top, left, height,
    width) in source-image pixels, each box inside the enclosing one. Returns (V, B, rows*cols)."""
    rows, cols = grid
    views, batch = boxes.shape[:2]
    enclosing = enclosing_box.float()[None]  # (1, B, 4)
    boxes = boxes.float()
    top = (boxes[..., 0] - enclosing[..., 0]) * rows / enclosing[..., 2]  # (V, B) in enclosing-grid cells
    left = (boxes[..., 1] - enclosing[..., 1]) * cols / enclosing[..., 3]
    bottom = top + boxes[..., 2] * rows / enclosing[..., 2]
    right = left + boxes[..., 3] * cols / enclosing[..., 3]
    image = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).expand(views, batch)
    regions = torch.stack([image, left, top, right, bottom], dim=-1).flatten(0, 1)  # (V*B, 5): x1, y1, x2, y2
    maps = attention.float().reshape(batch, 1, rows, cols)
    mapped = roi_align(maps, regions, (rows, cols), spatial_scale=1.0, sampling_ratio=0, aligned=True)  # (V*B, 1, ..)
    return mapped.reshape(views, batch, rows * cols)
