"""MAE (docs/methods/harmony.md 2.3): each global crop with 75% of its patches removed, the removed patches' normalized
pixels predicted by the MAE decoder; each crop in its own pass, losses summed over crops (the official code)."""

from dataclasses import dataclass

from model.decoders import MAEDecoder
from model.losses import mae_loss
from model.masking import random_keep_indices
from model.objectives.objective import MASK_NOTE, WEIGHT_NOTE, Objective, patch_grid, register
from model.ranges import ranged


@register
class MAE(Objective):
    @dataclass
    class Settings:
        weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
        decoder_width: int = ranged(512, "[1, inf)")  # the decoder's width
        decoder_depth: int = ranged(8, "[1, inf)")  # the decoder's blocks
        decoder_heads: int = ranged(16, "[1, inf)")  # the decoder's attention heads

    name = "mae"
    build_rank, pass_rank = 30, 70
    students = ("image_student",)
    global_views = 2
    reads = ("global_crops",)

    def attention_heads(self):
        return [("decoder_heads", self.settings.decoder_heads, "model.objectives.mae.decoder_width",
                 self.settings.decoder_width)]

    def networks(self, model):
        settings, patch_size = self.settings, self.model_config.patch_size
        return {"mae_decoder": lambda: MAEDecoder(model.image_student.embed_dim, patch_grid(self.model_config),
                                                  patch_size, settings.decoder_width, settings.decoder_depth,
                                                  settings.decoder_heads)}

    def passes(self, model, views, teacher, values):
        settings, patch_size, global_crops = self.settings, self.model_config.patch_size, views["global_crops"]
        crops, batch = global_crops.shape[:2]
        num_patches = (global_crops.shape[-2] // patch_size) * (global_crops.shape[-1] // patch_size)
        for crop in global_crops:  # (B, 3, H, W)
            keep, removed = random_keep_indices(batch, num_patches, settings.mask_ratio, crop.device)
            predictions = model.mae_decoder(model.image_student(crop, keep_indices=keep), keep, num_patches)
            loss, stats = mae_loss(predictions, crop, removed, patch_size)
            yield settings.weight * loss, {"mae": stats["mae"] / crops}  # the metric: the mean over crops
