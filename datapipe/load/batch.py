"""The Batch contract between datapipe and train (docs/design.md): views by name."""

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from datapipe.load.recipes import CAPTION


@dataclass
class Batch:
    images: dict[str, torch.Tensor]  # image view name -> (n, B, 3, H, W) normalized
    texts: dict[str, torch.Tensor]  # text view name -> (n, B, 77) int64: SOT, BPE ids, EOT, zero padding
    masks: dict[str, torch.Tensor]  # image view name -> (n, B, H/p, W/p) bool, True = mask token; masked views only
    boxes: dict[str, torch.Tensor]  # image view name -> (n, B, 4) float32 (top, left, height, width) px of the
    #                                  decoded image; views that ask for boxes only
    keys: list[str]  # "<shard>/<key>" of each sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) replaced in this batch
    # text view name -> the position after its last non-padding id in any row, counted on the host before the
    # copy, so that the step cuts the padding without reading the device; empty: not counted
    caption_lengths: dict[str, int] = field(default_factory=dict)

    # Harmony's and plain CLIP's names (MultiCrop, SingleCrop).
    @property
    def global_crops(self):  # (G, B, 3, Hg, Wg)
        return self.images["global_crops"]

    @property
    def local_crops(self):  # (L, B, 3, Hl, Wl); (0, B, 3, 0, 0) when the recipe has none
        if "local_crops" in self.images:
            return self.images["local_crops"]
        reference = self.images["global_crops"]
        return reference.new_empty((0, reference.shape[1], 3, 0, 0))

    @property
    def ibot_masks(self):  # (G, B, Hg/p, Wg/p); (0, B, 0, 0) when the global crops are not masked
        if "global_crops" in self.masks:
            return self.masks["global_crops"]
        return torch.empty(0, len(self.keys), 0, 0, dtype=torch.bool, device=self.images["global_crops"].device)

    @property
    def tokens(self):  # (B, 77): the one caption of a recipe without text views of its own
        return self.texts[CAPTION][0]

    def to(self, device, non_blocking=True):
        def moved(tensors):
            return {name: tensor.to(device, non_blocking=non_blocking) for name, tensor in tensors.items()}

        return replace(self, images=moved(self.images), texts=moved(self.texts), masks=moved(self.masks),
                       boxes=moved(self.boxes))


def assemble(crops, windows, raw, recipe, dtype):
    """A Batch from per-crop (B, 3, H, W) tensors and (B, 4) (top, left, height, width) windows in recipe order,
    and the RawBatch they came from."""
    images, boxes = {}, {}
    for name, crop_slice in recipe.crop_slices.items():
        images[name] = torch.stack(crops[crop_slice]).to(dtype)  # (n, B, 3, H, W)
        if recipe.image_views[name].boxes:
            boxes[name] = torch.from_numpy(np.stack(windows[crop_slice]).astype(np.float32))  # (n, B, 4)
    texts = {name: torch.from_numpy(tokens) for name, tokens in raw.texts.items()}
    masks = {name: torch.from_numpy(mask) for name, mask in raw.masks.items()}
    lengths = {name: longest_caption(tokens) for name, tokens in raw.texts.items()}
    return Batch(images, texts, masks, boxes, raw.keys, raw.skipped, lengths)


def longest_caption(tokens):
    """(..., 77) ids -> the position after the last non-padding id in any row (0 when all is padding)."""
    used = np.flatnonzero((tokens != 0).reshape(-1, tokens.shape[-1]).any(axis=0))  # columns holding an id
    return int(used[-1]) + 1 if used.size else 0
