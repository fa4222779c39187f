"""Image-text contrast: CLIP's InfoNCE (with optional soft targets from the EMA teachers, Harmony) or SigLIP's
sigmoid loss, on the first `views` global crops (Harmony: 1; 2 averaged) and the raw captions.

Options (docs/methods/clip.md, flip.md): the image pooling (`model.clip_pooling`, in the image tower so evaluation pools
the same way), FLIP's random patch removal on the contrastive view (`mask_ratio`, pos-embed added before removal, CLS
kept), label smoothing of the hard targets, an upper bound on the logit scale after each step. Embeddings are gathered
with gradient on every rank (local rows x gathered columns), docs/methods/README.md decision 3.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.collectives import gather_with_gradient, rank_and_world_size
from model.losses import clip_loss, siglip_loss
from model.masking import random_keep_indices
from model.objectives.objective import WEIGHT_NOTE, Objective, check_logit_scale_max, clamp_logit_scales, register
from model.ranges import ranged

CLIP_LOSSES = ("softmax", "sigmoid")
LOG_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial log logit scale


@register
class CLIP(Objective):
    @dataclass
    class Settings:
        weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        loss: str = "softmax"  # softmax: CLIP's InfoNCE; sigmoid: SigLIP
        # Harmony: soft targets from the EMA teachers, mixed with the hard ones by the schedule of
        # optim.clip_hard_weight_end / clip_hard_weight_epochs
        soft_targets: bool = False
        soft_temperature: float = ranged(0.1, "(0, inf)")  # temperature of the teachers' soft targets
        logit_scale_init: float = ranged(LOG_SCALE_INIT, "(-inf, inf)")  # initial log logit scale: log(1 / 0.07)
        # exp(logit scale) clamped to [1, this] after every optimizer step; 0 = never
        logit_scale_max: float = ranged(0.0, "[0, inf)")
        logit_bias_init: float = ranged(-10.0, "(-inf, inf)")  # SigLIP's learnable bias b
        mask_ratio: float = ranged(0.0, "[0, 1)", note="the share of patches FLIP removes; 0.5 = FLIP")
        label_smoothing: float = ranged(0.0, "[0, 1)")  # label smoothing of the hard targets
        views: int = ranged(1, "[1, 2]", note="CLIP reads 1 or 2 global crops")  # averaged

    name = "clip"
    build_rank, pass_rank = 20, 20
    students = ("image_student", "text_student")

    @classmethod
    def check(cls, settings, model_config):
        if settings.loss not in CLIP_LOSSES:
            raise ValueError(f"model.objectives.clip.loss={settings.loss!r} is not one of {CLIP_LOSSES}")
        check_logit_scale_max(cls.name, settings.logit_scale_max)
        if settings.soft_targets and settings.loss == "sigmoid":
            raise ValueError("model.objectives.clip: soft targets are softmax distributions and loss=sigmoid "
                             "(SigLIP) has none: set soft_targets=false or loss=softmax")
        if settings.label_smoothing and settings.loss == "sigmoid":
            raise ValueError("model.objectives.clip.label_smoothing smooths softmax targets: set it to 0 with "
                             "loss=sigmoid")
        if settings.soft_targets and settings.views != 1:
            raise ValueError("model.objectives.clip: soft targets read the teachers on global crop 1 only: set "
                             "views=1 or soft_targets=false")

    @property
    def global_views(self):
        return self.settings.views

    @property
    def teachers(self):
        return ("image_student", "text_student") if self.settings.soft_targets else ()

    @property
    def schedules(self):
        return ("clip_hard_weight",) if self.settings.soft_targets else ()

    @property
    def teacher_image_views(self):
        return 1 if self.settings.soft_targets else 0

    def networks(self, model):
        settings = self.settings
        networks = {"logit_scale": lambda: nn.Parameter(torch.tensor(settings.logit_scale_init))}
        if settings.loss == "sigmoid":
            networks["logit_bias"] = lambda: nn.Parameter(torch.tensor(settings.logit_bias_init))
        return networks

    def after_step(self, model):
        clamp_logit_scales(model, ("logit_scale",), self.settings.logit_scale_max)

    def teacher_outputs(self, model, seen, views):
        """Soft CLIP targets' embeddings: clip_image and clip_text (B, clip_dim), L2-normalized, of crop 1."""
        if not self.settings.soft_targets:
            return {}
        return {"clip_image": F.normalize(model.teachers["image_student"].embed_tokens(seen["image_tokens"][0]),
                                           dim=-1),
                "clip_text": F.normalize(seen["text_embedding"], dim=-1)}

    def embed_view(self, model, crop):
        """(B, 3, H, W) -> (B, clip_dim) L2-normalized, from all patches or FLIP's random share of them."""
        keep, patch_size = None, self.model_config.patch_size
        if self.settings.mask_ratio > 0:
            grid = (crop.shape[-2] // patch_size) * (crop.shape[-1] // patch_size)
            keep, _ = random_keep_indices(crop.shape[0], grid, self.settings.mask_ratio, crop.device)
        return F.normalize(model.image_student.embed_image(crop, keep_indices=keep), dim=-1)

    def passes(self, model, views, teacher, values):
        settings = self.settings
        images = [self.embed_view(model, crop) for crop in views["global_crops"][:settings.views]]  # (B, clip_dim)
        text = F.normalize(model.text_student(views["tokens"])[0], dim=-1)  # (B, clip_dim)
        teacher_image, teacher_text = teacher.pop("clip_image", None), teacher.pop("clip_text", None)
        rank, _ = rank_and_world_size()
        losses, stats = [], {}
        for image in images:
            if settings.loss == "sigmoid":
                loss, view_stats = siglip_loss(image, gather_with_gradient(text), model.logit_scale, model.logit_bias,
                                               rank)
            else:
                hard_weight, soft_targets = values["clip_hard_weight"], None
                if settings.soft_targets and hard_weight != 1.0:
                    soft_targets = (teacher_image, teacher_text,
                                    gather_with_gradient(teacher_image), gather_with_gradient(teacher_text))
                loss, view_stats = clip_loss(image, text, gather_with_gradient(image), gather_with_gradient(text),
                                             model.logit_scale, rank, hard_weight, soft_targets,
                                             settings.soft_temperature, settings.label_smoothing)
            losses.append(loss)
            for name, value in view_stats.items():
                stats[name] = stats.get(name, 0) + value / len(images)
        loss = torch.stack(losses).mean()
        stats["clip"] = loss.detach()
        yield settings.weight * loss, stats
