"""MAE (docs/methods/harmony.md 2.3): each global crop with 75% of its patches removed, the removed patches' normalized
pixels predicted by the MAE decoder; each crop in its own pass, losses summed over crops (the official code)."""

from model.decoders import MAEDecoder
from model.losses import mae_loss
from model.masking import random_keep_indices
from model.objectives.objective import Objective, register


@register
class MAE(Objective):
    name = "mae"
    build_rank, pass_rank = 30, 70
    students = ("image_student",)
    reads = ("global_crops",)

    def networks(self, config, model):
        grid = (config.global_crop_px // config.patch_size,) * 2
        return {"mae_decoder": lambda: MAEDecoder(model.image_student.embed_dim, grid, config.patch_size,
                                                  config.mae_decoder_width, config.mae_decoder_depth,
                                                  config.mae_decoder_heads)}

    def passes(self, model, views, teacher, values):
        config, global_crops = self.config, views["global_crops"]
        crops, batch = global_crops.shape[:2]
        num_patches = (global_crops.shape[-2] // config.patch_size) * (global_crops.shape[-1] // config.patch_size)
        for crop in global_crops:  # (B, 3, H, W)
            keep, removed = random_keep_indices(batch, num_patches, config.mae_mask_ratio, crop.device)
            predictions = model.mae_decoder(model.image_student(crop, keep_indices=keep), keep, num_patches)
            loss, stats = mae_loss(predictions, crop, removed, config.patch_size)
            yield config.mae_weight * loss, {"mae": stats["mae"] / crops}  # the metric: the mean over crops
