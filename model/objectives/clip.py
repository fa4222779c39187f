"""Image-text contrast: CLIP's InfoNCE (with optional soft targets from the EMA teachers, Harmony) or SigLIP's
sigmoid loss, on the first `clip_views` global crops (Harmony: 1; DetailCLIP: 2, averaged) and the raw captions.

Options (docs/methods/clip.md, flip.md): the image pooling (`clip_pooling`, in the image tower so evaluation pools the
same way), FLIP's random patch removal on the contrastive view (`clip_mask_ratio`, pos-embed added before removal, CLS
kept), label smoothing of the hard targets (the logit scale's upper bound is the meta-architecture's
`after_optimizer_step`). Embeddings are gathered with gradient on every rank (local rows x gathered columns),
docs/methods/README.md decision 3.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.collectives import gather_with_gradient, rank_and_world_size
from model.losses import clip_loss, siglip_loss
from model.masking import random_keep_indices
from model.objectives.objective import Objective, register


@register
class CLIP(Objective):
    name = "clip"
    build_rank, pass_rank = 20, 20
    students = ("image_student", "text_student")

    @property
    def teachers(self):
        return ("image_student", "text_student") if self.config.soft_clip else ()

    @property
    def schedules(self):
        return ("clip_hard_weight",) if self.config.soft_clip else ()

    @property
    def teacher_image_views(self):
        return 1 if self.config.soft_clip else 0

    def networks(self, config, model):
        networks = {"logit_scale": lambda: nn.Parameter(torch.tensor(config.logit_scale_init))}
        if config.clip_loss == "sigmoid":
            networks["logit_bias"] = lambda: nn.Parameter(torch.tensor(config.logit_bias_init))
        return networks

    def teacher_outputs(self, model, seen, views):
        """Soft CLIP targets' embeddings: clip_image and clip_text (B, clip_dim), L2-normalized, of crop 1."""
        if not self.config.soft_clip:
            return {}
        return {"clip_image": F.normalize(model.teachers["image_student"].embed_tokens(seen["image_tokens"][0]),
                                           dim=-1),
                "clip_text": F.normalize(seen["text_embedding"], dim=-1)}

    def embed_view(self, model, crop):
        """(B, 3, H, W) -> (B, clip_dim) L2-normalized, from all patches or FLIP's random share of them."""
        keep = None
        if self.config.clip_mask_ratio > 0:
            grid = (crop.shape[-2] // self.config.patch_size) * (crop.shape[-1] // self.config.patch_size)
            keep, _ = random_keep_indices(crop.shape[0], grid, self.config.clip_mask_ratio, crop.device)
        return F.normalize(model.image_student.embed_image(crop, keep_indices=keep), dim=-1)

    def passes(self, model, views, teacher, values):
        config = self.config
        images = [self.embed_view(model, crop) for crop in views["global_crops"][:config.clip_views]]  # (B, clip_dim)
        text = F.normalize(model.text_student(views["tokens"])[0], dim=-1)  # (B, clip_dim)
        teacher_image, teacher_text = teacher.pop("clip_image", None), teacher.pop("clip_text", None)
        rank, _ = rank_and_world_size()
        losses, stats = [], {}
        for image in images:
            if config.clip_loss == "sigmoid":
                loss, view_stats = siglip_loss(image, gather_with_gradient(text), model.logit_scale, model.logit_bias,
                                               rank)
            else:
                hard_weight, soft_targets = values["clip_hard_weight"], None
                if config.soft_clip and hard_weight != 1.0:
                    soft_targets = (teacher_image, teacher_text,
                                    gather_with_gradient(teacher_image), gather_with_gradient(teacher_text))
                loss, view_stats = clip_loss(image, text, gather_with_gradient(image), gather_with_gradient(text),
                                             model.logit_scale, rank, hard_weight, soft_targets,
                                             config.soft_clip_temperature, config.clip_label_smoothing)
            losses.append(loss)
            for name, value in view_stats.items():
                stats[name] = stats.get(name, 0) + value / len(images)
        loss = torch.stack(losses).mean()
        stats["clip"] = loss.detach()
        yield config.clip_weight * loss, stats
