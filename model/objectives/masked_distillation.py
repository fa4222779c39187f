"""MaskCLIP's masked self-distillation (Harmony's re-implementation, docs/methods/maskclip.md): the student encoder sees
a random 25% of global crop 1's patches, a 1-block decoder (encoder width) puts mask tokens at the others, and each
removed patch's output is distilled towards the EMA teacher's token of the full crop: softmax over the token's
channels, the teacher centred (EMA of its mean patch token) and sharpened. One backward pass."""

import torch

from model.decoders import MAEDecoder
from model.losses import masked_distillation_loss
from model.masking import random_keep_indices
from model.objectives.objective import Objective, register, update_center


@register
class MaskedDistillation(Objective):
    name = "masked_distillation"
    build_rank, pass_rank = 50, 80
    schedules = ("teacher_patch_temp",)
    students = ("image_student",)
    teachers = ("image_student",)
    reads = ("global_crops",)
    teacher_image_views = 1

    def networks(self, config, model):
        embed_dim, grid = model.image_student.embed_dim, (config.global_crop_px // config.patch_size,) * 2
        return {"masked_distillation_decoder": lambda: MAEDecoder(
            embed_dim, grid, config.patch_size, width=embed_dim, depth=config.masked_distillation_decoder_depth,
            num_heads=config.masked_distillation_decoder_heads, out_dim=embed_dim)}

    def buffers(self, config):
        return {"masked_distillation_center": torch.zeros(1, 1, config.vit_embed_dim)}

    def teacher_outputs(self, model, seen, views):
        """masked_distillation_targets (B, N, D): the teacher's patch tokens of the full global crop 1."""
        return {"masked_distillation_targets": seen["image_tokens"][0, :, 1:]}

    def passes(self, model, views, teacher, values):
        config, crop = self.config, views["global_crops"][0]  # (B, 3, H, W)
        num_patches = (crop.shape[-2] // config.patch_size) * (crop.shape[-1] // config.patch_size)
        keep, removed = random_keep_indices(crop.shape[0], num_patches, config.masked_distillation_mask_ratio,
                                            crop.device)
        predictions = model.masked_distillation_decoder(model.image_student(crop, keep_indices=keep), keep,
                                                        num_patches)  # (B, N, D)
        loss, stats = masked_distillation_loss(predictions, teacher.pop("masked_distillation_targets"), removed,
                                               model.masked_distillation_center, values["teacher_patch_temp"],
                                               config.student_temp)
        update_center(model.masked_distillation_center, stats.pop("teacher_patch_mean"), config.center_momentum)
        yield config.masked_distillation_weight * loss, stats
