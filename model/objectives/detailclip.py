"""DetailCLIP (docs/methods/detailclip.md): on each of two views, the EMA teacher's CLS attention removes half of the
patches in 2x2 blocks (A-CLIP style); the student's masked view feeds
- CLIP: its CLS through the contrastive projection against the captions, 0.5 per view;
- reconstruction: a 1-block decoder (encoder width) puts mask tokens at the removed patches, a pixel head predicts
  their per-patch normalized pixels (MAE loss), 0.5 per view;
- iBOT: the student's CLS against the teacher's CLS of the other view, and the decoder's removed-patch tokens against
  the teacher's patch tokens of the same full view, through the iBOT head (its EMA copy for the teacher).
Loss = clip_weight * CLIP + mae_weight * reconstruction + ibot_cls_weight * CLS + ibot_patch_weight * patch
(DetailCLIP's flags, all 1). Both views in one backward pass (the captions' embedding is shared by them)."""

import torch
import torch.nn.functional as F
from torch import nn

from model.collectives import gather_with_gradient, rank_and_world_size
from model.decoders import MAEDecoder
from model.heads import ibot_head
from model.losses import clip_loss, ibot_loss_share, mae_loss, teacher_probs
from model.masking import attentive_keep_indices
from model.objectives.objective import Objective, register, update_center


@register
class DetailCLIP(Objective):
    name = "detailclip"
    build_rank, pass_rank = 70, 40
    schedules = ("teacher_cls_temp", "teacher_patch_temp")
    students = ("image_student", "text_student")
    teachers = ("image_student", "ibot_head")
    teacher_image_views = 2
    teacher_attention = True

    def networks(self, config, model):
        embed_dim, grid = model.image_student.embed_dim, (config.global_crop_px // config.patch_size,) * 2
        return {"ibot_head": lambda: ibot_head(embed_dim, config.ibot_out_dim, config.ibot_head_hidden_dim,
                                               config.head_bottleneck_dim),
                "detail_decoder": lambda: MAEDecoder(embed_dim, grid, config.patch_size, width=embed_dim,
                                                     depth=config.detail_decoder_depth,
                                                     num_heads=config.detail_decoder_heads, out_dim=embed_dim),
                "pixel_head": lambda: nn.Linear(embed_dim, config.patch_size ** 2 * 3),
                "logit_scale": lambda: nn.Parameter(torch.tensor(config.logit_scale_init))}

    def buffers(self, config):
        return {"ibot_cls_center": torch.zeros(1, config.ibot_out_dim),
                "ibot_patch_center": torch.zeros(1, 1, config.ibot_out_dim)}

    def teacher_outputs(self, model, seen, views):
        """detail_keep (2, B, n_keep), detail_removed (2, B, N) from the teacher's attention on each full view;
        detail_cls (2, B, K), detail_removed_patches (n, K) in removed.nonzero() order, detail_patch_mean (1, 1, K)."""
        image_tokens, attention = seen["image_tokens"][:2], seen["image_attention"][:2]  # (2, B, 1 + N, D), (2, B, N)
        grid = (self.config.global_crop_px // self.config.patch_size,) * 2
        kept = [attentive_keep_indices(view_attention, grid, self.config.detail_mask_ratio)
                for view_attention in attention]
        keep, removed = torch.stack([k for k, _ in kept]), torch.stack([r for _, r in kept])
        head = model.teachers["ibot_head"]
        bottleneck = head.bottleneck(image_tokens)  # (2, B, 1 + N, bottleneck_dim)
        patches = bottleneck[:, :, 1:]
        return {"detail_keep": keep, "detail_removed": removed, "detail_cls": head.last_layer(bottleneck[:, :, 0]),
                "detail_removed_patches": head.last_layer(patches[removed]),
                "detail_patch_mean": head.last_layer(patches.mean(dim=(0, 1, 2)))[None, None]}

    def passes(self, model, views, teacher, values):
        config, global_crops = self.config, views["global_crops"][:2]  # (2, B, 3, H, W)
        num_patches = (global_crops.shape[-2] // config.patch_size) * (global_crops.shape[-1] // config.patch_size)
        keep, removed = teacher.pop("detail_keep"), teacher.pop("detail_removed")
        teacher_cls = teacher.pop("detail_cls")
        cls_probs = teacher_probs(teacher_cls, model.ibot_cls_center, values["teacher_cls_temp"])  # (2, B, K)
        patch_probs = teacher_probs(teacher.pop("detail_removed_patches"), model.ibot_patch_center[0],
                                    values["teacher_patch_temp"])  # (n, K)
        update_center(model.ibot_cls_center, teacher_cls.flatten(0, 1).mean(0, keepdim=True), config.center_momentum)
        update_center(model.ibot_patch_center, teacher.pop("detail_patch_mean"), config.center_momentum)
        text = F.normalize(model.text_student(views["tokens"])[0], dim=-1)  # (B, clip_dim)
        rank, _ = rank_and_world_size()
        clip_terms, reconstruction_terms, student_cls, removed_patches = [], [], [], []
        for view, crop in enumerate(global_crops):
            tokens = model.image_student(crop, keep_indices=keep[view])  # (B, 1 + n_keep, D)
            image = F.normalize(model.image_student.embed_tokens(tokens), dim=-1)
            clip_terms.append(clip_loss(image, text, gather_with_gradient(image), gather_with_gradient(text),
                                        model.logit_scale, rank)[0])
            decoded = model.detail_decoder(tokens, keep[view], num_patches)  # (B, N, D)
            reconstruction_terms.append(mae_loss(model.pixel_head(decoded), crop, removed[view], config.patch_size)[0])
            student_cls.append(model.ibot_head(tokens[:, 0]))  # (B, K)
            removed_patches.append(model.ibot_head(decoded[removed[view]]))  # (n_v, K)
        clip = torch.stack(clip_terms).mean()
        reconstruction = torch.stack(reconstruction_terms).mean()
        # iBOT with unit weights; cls_pairs 2: (teacher u, student v) and (teacher v, student u).
        ibot, ibot_stats = ibot_loss_share(torch.stack(student_cls), (0, 1), torch.cat(removed_patches), cls_probs,
                                           patch_probs, removed, 2, config.student_temp, config.ibot_cls_weight,
                                           config.ibot_patch_weight)
        loss = config.clip_weight * clip + config.mae_weight * reconstruction + ibot
        yield loss, {"detail_clip": clip.detach(), "detail_reconstruction": reconstruction.detach(), **ibot_stats,
                     "logit_scale": model.logit_scale.exp().detach(), "detailclip": loss.detach()}
