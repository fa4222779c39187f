"""DetailCLIP (docs/methods/detailclip.md): on each of two views, the EMA teacher's CLS attention removes half of the
patches in 2x2 blocks (A-CLIP style); the student's masked view feeds
- CLIP: its CLS through the contrastive projection against the captions, 0.5 per view;
- reconstruction: a 1-block decoder (encoder width) puts mask tokens at the removed patches, a pixel head predicts
  their per-patch normalized pixels (MAE loss), 0.5 per view;
- iBOT: the student's CLS against the teacher's CLS of the other view, and the decoder's removed-patch tokens against
  the teacher's patch tokens of the same full view, through the iBOT head (its EMA copy for the teacher).
Loss = clip_weight * CLIP + reconstruction_weight * reconstruction + cls_weight * CLS + patch_weight * patch
(DetailCLIP's flags, all 1). Both views in one backward pass (the captions' embedding is shared by them)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.collectives import gather_with_gradient, rank_and_world_size
from model.decoders import MAEDecoder
from model.losses import clip_loss, ibot_loss_share, mae_loss, teacher_probs
from model.masking import attentive_keep_indices
from model.objectives.clip import LOG_SCALE_INIT
from model.objectives.ibot import DistillationSettings, distillation_centers, distillation_head
from model.objectives.objective import (
    MASK_NOTE,
    WEIGHT_NOTE,
    Objective,
    check_even_grid,
    check_logit_scale_max,
    clamp_logit_scales,
    patch_grid,
    register,
    update_center,
)
from model.ranges import ranged


@register
class DetailCLIP(Objective):
    """Its iBOT teacher temperatures are optim.teacher_cls_temp and optim.teacher_patch_temp."""

    @dataclass
    class Settings(DistillationSettings):
        cls_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)  # the iBOT CLS term
        patch_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)  # the iBOT patch term
        clip_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        reconstruction_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        # removed in 2x2 blocks by the teacher's attention (100 of 196 patches kept)
        mask_ratio: float = ranged(0.5, "(0, 1)", note=MASK_NOTE)
        decoder_depth: int = ranged(1, "[1, inf)")  # its pixel decoder's blocks
        decoder_heads: int = ranged(16, "[1, inf)")  # its pixel decoder's attention heads
        logit_scale_init: float = ranged(LOG_SCALE_INIT, "(-inf, inf)")  # initial log logit scale
        logit_scale_max: float = ranged(0.0, "[0, inf)")  # exp(logit scale) clamped to [1, this]; 0 = never

    name = "detailclip"
    excludes = ("ibot", "clip", "mae")  # it holds its own CLIP, iBOT and reconstruction terms
    build_rank, pass_rank = 70, 40
    schedules = ("teacher_cls_temp", "teacher_patch_temp")
    students = ("image_student", "text_student")
    global_views = 2
    teachers = ("image_student", "ibot_head")
    clipped = ("ibot_head",)
    frozen_first_epochs = ("ibot_head.last_layer",)
    teacher_image_views = 2
    teacher_attention = True

    @classmethod
    def check(cls, settings, model_config):
        check_logit_scale_max(cls.name, settings.logit_scale_max)
        check_even_grid(cls.name, model_config)

    def attention_heads(self):
        return [("decoder_heads", self.settings.decoder_heads, "the image tower's width",
                 self.model_config.vit_embed_dim)]

    def networks(self, model):
        settings, patch_size, embed_dim = self.settings, self.model_config.patch_size, model.image_student.embed_dim
        return {"ibot_head": lambda: distillation_head(settings, embed_dim),
                "detail_decoder": lambda: MAEDecoder(embed_dim, patch_grid(self.model_config), patch_size,
                                                     width=embed_dim, depth=settings.decoder_depth,
                                                     num_heads=settings.decoder_heads, out_dim=embed_dim),
                "pixel_head": lambda: nn.Linear(embed_dim, patch_size ** 2 * 3),
                "logit_scale": lambda: nn.Parameter(torch.tensor(settings.logit_scale_init))}

    def buffers(self):
        return distillation_centers(self.settings)

    def after_step(self, model):
        clamp_logit_scales(model, ("logit_scale",), self.settings.logit_scale_max)

    def teacher_outputs(self, model, seen, views):
        """detail_keep (2, B, n_keep), detail_removed (2, B, N) from the teacher's attention on each full view;
        detail_cls (2, B, K), detail_removed_patches (n, K) in removed.nonzero() order, detail_patch_mean (1, 1, K)."""
        image_tokens, attention = seen["image_tokens"][:2], seen["image_attention"][:2]  # (2, B, 1 + N, D), (2, B, N)
        grid = patch_grid(self.model_config)
        kept = [attentive_keep_indices(view_attention, grid, self.settings.mask_ratio)
                for view_attention in attention]
        keep, removed = torch.stack([k for k, _ in kept]), torch.stack([r for _, r in kept])
        head = model.teachers["ibot_head"]
        bottleneck = head.bottleneck(image_tokens)  # (2, B, 1 + N, bottleneck_dim)
        patches = bottleneck[:, :, 1:]
        return {"detail_keep": keep, "detail_removed": removed, "detail_cls": head.last_layer(bottleneck[:, :, 0]),
                "detail_removed_patches": head.last_layer(patches[removed]),
                "detail_patch_mean": head.last_layer(patches.mean(dim=(0, 1, 2)))[None, None]}

    def passes(self, model, views, teacher, values):
        settings, patch_size = self.settings, self.model_config.patch_size
        global_crops = views["global_crops"][:2]  # (2, B, 3, H, W)
        num_patches = (global_crops.shape[-2] // patch_size) * (global_crops.shape[-1] // patch_size)
        keep, removed = teacher.pop("detail_keep"), teacher.pop("detail_removed")
        teacher_cls = teacher.pop("detail_cls")
        cls_probs = teacher_probs(teacher_cls, model.ibot_cls_center, values["teacher_cls_temp"])  # (2, B, K)
        patch_probs = teacher_probs(teacher.pop("detail_removed_patches"), model.ibot_patch_center[0],
                                    values["teacher_patch_temp"])  # (n, K)
        update_center(model.ibot_cls_center, teacher_cls.flatten(0, 1).mean(0, keepdim=True), settings.center_momentum)
        update_center(model.ibot_patch_center, teacher.pop("detail_patch_mean"), settings.center_momentum)
        text = F.normalize(model.text_student(views["tokens"])[0], dim=-1)  # (B, clip_dim)
        rank, _ = rank_and_world_size()
        clip_terms, reconstruction_terms, student_cls, removed_patches = [], [], [], []
        for view, crop in enumerate(global_crops):
            tokens = model.image_student(crop, keep_indices=keep[view])  # (B, 1 + n_keep, D)
            image = F.normalize(model.image_student.embed_tokens(tokens), dim=-1)
            clip_terms.append(clip_loss(image, text, gather_with_gradient(image), gather_with_gradient(text),
                                        model.logit_scale, rank)[0])
            decoded = model.detail_decoder(tokens, keep[view], num_patches)  # (B, N, D)
            reconstruction_terms.append(mae_loss(model.pixel_head(decoded), crop, removed[view], patch_size)[0])
            student_cls.append(model.ibot_head(tokens[:, 0]))  # (B, K)
            removed_patches.append(model.ibot_head(decoded[removed[view]]))  # (n_v, K)
        clip = torch.stack(clip_terms).mean()
        reconstruction = torch.stack(reconstruction_terms).mean()
        # iBOT with unit weights; cls_pairs 2: (teacher u, student v) and (teacher v, student u).
        ibot, ibot_stats = ibot_loss_share(torch.stack(student_cls), (0, 1), torch.cat(removed_patches), cls_probs,
                                           patch_probs, removed, 2, settings.student_temp, settings.cls_weight,
                                           settings.patch_weight)
        loss = settings.clip_weight * clip + settings.reconstruction_weight * reconstruction + ibot
        yield loss, {"detail_clip": clip.detach(), "detail_reconstruction": reconstruction.detach(), **ibot_stats,
                     "logit_scale": model.logit_scale.exp().detach(), "detailclip": loss.detach()}
