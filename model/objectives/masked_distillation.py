"""MaskCLIP's masked self-distillation (Harmony's re-implementation, docs/methods/maskclip.md): the student encoder sees
a random 25% of global crop 1's patches, a 1-block decoder (encoder width) puts mask tokens at the others, and each
removed patch's output is distilled towards the EMA teacher's token of the full crop: softmax over the token's
channels, the teacher centred (EMA of its mean patch token) and sharpened. One backward pass."""

from dataclasses import dataclass

import torch

from model.decoders import MAEDecoder
from model.losses import masked_distillation_loss
from model.masking import random_keep_indices
from model.objectives.objective import MASK_NOTE, WEIGHT_NOTE, Objective, patch_grid, register, update_center
from model.ranges import ranged


@register
class MaskedDistillation(Objective):
    """Its teacher temperature is optim.teacher_patch_temp."""

    @dataclass
    class Settings:
        weight: float = ranged(0.05, "[0, inf)", note=WEIGHT_NOTE)
        mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
        decoder_depth: int = ranged(1, "[1, inf)")  # its decoder's blocks (the image tower's width)
        decoder_heads: int = ranged(16, "[1, inf)")  # its decoder's attention heads
        student_temp: float = ranged(0.1, "(0, inf)")  # the student's softmax temperature
        center_momentum: float = ranged(0.9, "[0, 1]")  # EMA momentum of the teacher's output centre

    name = "masked_distillation"
    build_rank, pass_rank = 50, 80
    schedules = ("teacher_patch_temp",)
    students = ("image_student",)
    teachers = ("image_student",)
    reads = ("global_crops",)
    teacher_image_views = 1

    global_views = 1

    def attention_heads(self):
        return [("decoder_heads", self.settings.decoder_heads, "the image tower's width",
                 self.model_config.vit_embed_dim)]

    def networks(self, model):
        settings, embed_dim = self.settings, model.image_student.embed_dim
        return {"masked_distillation_decoder": lambda: MAEDecoder(
            embed_dim, patch_grid(self.model_config), self.model_config.patch_size, width=embed_dim,
            depth=settings.decoder_depth, num_heads=settings.decoder_heads, out_dim=embed_dim)}

    def buffers(self):
        return {"masked_distillation_center": torch.zeros(1, 1, self.model_config.vit_embed_dim)}

    def teacher_outputs(self, model, seen, views):
        """masked_distillation_targets (B, N, D): the teacher's patch tokens of the full global crop 1."""
        return {"masked_distillation_targets": seen["image_tokens"][0, :, 1:]}

    def passes(self, model, views, teacher, values):
        settings, patch_size = self.settings, self.model_config.patch_size
        crop = views["global_crops"][0]  # (B, 3, H, W)
        num_patches = (crop.shape[-2] // patch_size) * (crop.shape[-1] // patch_size)
        keep, removed = random_keep_indices(crop.shape[0], num_patches, settings.mask_ratio, crop.device)
        predictions = model.masked_distillation_decoder(model.image_student(crop, keep_indices=keep), keep,
                                                        num_patches)  # (B, N, D)
        loss, stats = masked_distillation_loss(predictions, teacher.pop("masked_distillation_targets"), removed,
                                               model.masked_distillation_center, values["teacher_patch_temp"],
                                               settings.student_temp)
        update_center(model.masked_distillation_center, stats.pop("teacher_patch_mean"), settings.center_momentum)
        yield settings.weight * loss, stats
