"""A-CLIP (docs/methods/aclip.md): the EMA image teacher sees the zoom-out `enclosing` crop; its CLS attention, mapped
onto each of the two `online` crops' boxes and pooled to 2x2 blocks, keeps the int(blocks * (1 - mask_ratio)) + 1
most attended blocks (100 of 196 patches at 224 px / 16 px) and removes the rest. The student encodes each online crop
from its kept patches only; its tokens feed
- CLIP: each view's projected CLS against the same captions, averaged (0.5 per view), weight `clip_weight`;
- SimCLR: the CLS of view 1 against view 2 through SLIP's head (`simclr_*` settings), NT-Xent (the official
  `[:bs]` compares view 1 with itself; decision 3);
- BYOL: predictor(projector(CLS)) of both views against the EMA projector of the teacher's CLS on the enclosing crop,
  2 - 2 cos, mean over both views, weight `byol_weight`.
The heads see both views in one batch (BN statistics over 2B rows), as the official code. The patch embedding is
frozen (MoCo v3) while `freeze_patch_embed`. One backward pass (the captions' embedding is shared)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch_norm import mlp
from model.collectives import gather_with_gradient, rank_and_world_size
from model.losses import byol_loss, clip_loss
from model.masking import attention_in_boxes, attentive_keep_indices
from model.objectives.clip import LOG_SCALE_INIT
from model.objectives.objective import (
    MASK_NOTE,
    WEIGHT_NOTE,
    Objective,
    check_even_grid,
    check_logit_scale_max,
    clamp_logit_scales,
    register,
)
from model.objectives.simclr import simclr_between, simclr_head
from model.ranges import ranged


@register
class ACLIP(Objective):
    @dataclass
    class Settings:
        # removed in 2x2 blocks by the teacher's mapped attention (100 of 196 patches kept)
        mask_ratio: float = ranged(0.5, "(0, 1)", note=MASK_NOTE)
        freeze_patch_embed: bool = True  # MoCo v3 style: the patch embedding keeps its initial weights
        clip_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        logit_scale_init: float = ranged(LOG_SCALE_INIT, "(-inf, inf)")  # initial log logit scale
        logit_scale_max: float = ranged(0.0, "[0, inf)")  # exp(logit scale) clamped to [1, this]; 0 = never
        simclr_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        simclr_temperature: float = ranged(0.1, "(0, inf)", note="A-CLIP: 0.1")
        simclr_hidden_dim: int = ranged(4096, "[1, inf)")  # SimCLR head's MLP width
        simclr_out_dim: int = ranged(256, "[1, inf)")  # SimCLR head's output width
        byol_weight: float = ranged(2.0, "[0, inf)", note=WEIGHT_NOTE)
        byol_hidden_dim: int = ranged(4096, "[1, inf)")  # BYOL projector's and predictor's MLP width
        byol_out_dim: int = ranged(256, "[1, inf)")  # BYOL projector's output width

    name = "aclip"
    # it holds its own CLIP and SimCLR terms, and its image teacher sees the enclosing view
    excludes = ("ibot", "clip", "mae", "simclr", "detailclip")
    build_rank, pass_rank = 90, 50
    students = ("image_student", "text_student")
    teachers = ("image_student", "byol_projector")
    reads = ("online", "enclosing", "online_boxes", "enclosing_boxes", "tokens")
    teacher_view = "enclosing"
    teacher_image_views = 1
    teacher_attention = True

    @classmethod
    def check(cls, settings, model_config):
        check_logit_scale_max(cls.name, settings.logit_scale_max)
        check_even_grid(cls.name, model_config)

    @property
    def frozen(self):
        return ("image_student.patch_embed",) if self.settings.freeze_patch_embed else ()

    def networks(self, model):
        settings, embed_dim = self.settings, model.image_student.embed_dim
        hidden, out = settings.byol_hidden_dim, settings.byol_out_dim
        return {"simclr_head": lambda: simclr_head(embed_dim, settings.simclr_hidden_dim, settings.simclr_out_dim),
                "byol_projector": lambda: mlp(embed_dim, (hidden,), out, bias=False),
                "byol_predictor": lambda: mlp(out, (hidden,), out, bias=False),
                "logit_scale": lambda: nn.Parameter(torch.tensor(settings.logit_scale_init))}

    def after_step(self, model):
        clamp_logit_scales(model, ("logit_scale",), self.settings.logit_scale_max)

    def teacher_outputs(self, model, seen, views):
        """aclip_keep (2, B, n_keep): the patches each online crop keeps; aclip_target (B, byol_out_dim): the EMA
        projector of the teacher's CLS on the enclosing crop."""
        enclosing = views["enclosing"]  # (1, B, 3, H, W)
        patch_size = self.model_config.patch_size
        grid = (enclosing.shape[-2] // patch_size, enclosing.shape[-1] // patch_size)
        online_attention = attention_in_boxes(seen["image_attention"][0], grid, views["enclosing_boxes"][0],
                                              views["online_boxes"])  # (2, B, N)
        keep, _ = attentive_keep_indices(online_attention.flatten(0, 1), grid, self.settings.mask_ratio)
        return {"aclip_keep": keep.unflatten(0, online_attention.shape[:2]),
                "aclip_target": model.teachers["byol_projector"](seen["image_tokens"][0, :, 0])}

    def passes(self, model, views, teacher, values):
        settings, online = self.settings, views["online"]  # (2, B, 3, H, W)
        keep, target = teacher.pop("aclip_keep"), teacher.pop("aclip_target")  # (2, B, n_keep), (B, byol_out_dim)
        tokens = model.image_student(online.flatten(0, 1), keep_indices=keep.flatten(0, 1))  # (2B, 1 + n_keep, D)
        cls = tokens[:, 0]  # (2B, D), view 1's rows first
        images = F.normalize(model.image_student.embed_tokens(tokens), dim=-1).unflatten(0, online.shape[:2])
        text = F.normalize(model.text_student(views["tokens"])[0], dim=-1)  # (B, clip_dim)
        text_all, rank = gather_with_gradient(text), rank_and_world_size()[0]
        clip = torch.stack([clip_loss(image, text, gather_with_gradient(image), text_all, model.logit_scale, rank)[0]
                            for image in images]).mean()
        ssl = model.simclr_head(cls).unflatten(0, online.shape[:2])  # (2, B, simclr_out_dim)
        simclr, _ = simclr_between(ssl[0], ssl[1], settings.simclr_temperature)
        predictions = model.byol_predictor(model.byol_projector(cls))  # (2B, byol_out_dim)
        byol, _ = byol_loss(predictions, target.repeat(2, 1))  # the one target for both views
        loss = settings.clip_weight * clip + settings.simclr_weight * simclr + settings.byol_weight * byol
        yield loss, {"aclip_clip": clip.detach(), "aclip_simclr": simclr.detach(), "aclip_byol": byol.detach(),
                     "logit_scale": model.logit_scale.exp().detach(), "aclip": loss.detach()}
