"""The Batch contract between datapipe and train (../shared/DESIGN.md)."""

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    global_crops: torch.Tensor  # (G, B, 3, Hg, Wg) normalized; G = 2 (MultiCrop) or 1 (SingleCrop)
    local_crops: torch.Tensor  # (L, B, 3, Hl, Wl); (0, B, 3, 0, 0) when there are none
    tokens: torch.Tensor  # (B, 77) int64: SOT, BPE ids, EOT, zero padding
    ibot_masks: torch.Tensor  # (G, B, Hg/p, Wg/p) bool, True = mask token; (0, B, 0, 0) for SingleCrop
    keys: list[str]  # "<shard>/<key>" of each sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) replaced in this batch

    def to(self, device, non_blocking=True):
        tensors = ("global_crops", "local_crops", "tokens", "ibot_masks")
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking) for name in tensors})


def assemble(crops, raw, recipe, dtype):
    """A Batch from per-crop (B, 3, H, W) tensors in recipe order and the RawBatch they came from."""
    num_global = len(recipe.global_crops)
    batch = raw.tokens.shape[0]
    global_crops = torch.stack(crops[:num_global]).to(dtype)
    local_crops = torch.stack(crops[num_global:]).to(dtype) if len(crops) > num_global else \
        torch.empty(0, batch, 3, 0, 0, dtype=dtype, device=global_crops.device)
    masks = torch.from_numpy(raw.masks) if raw.masks is not None else torch.empty(0, batch, 0, 0, dtype=torch.bool)
    return Batch(global_crops, local_crops, torch.from_numpy(raw.tokens), masks, raw.keys, raw.skipped)
