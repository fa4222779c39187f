"""Harmony: the students, their EMA teachers, and one method per backward group.

The trainer calls, per step: `forward_teachers` once (no grad), then the passes of the iBOT, CLIP,
text and MAE groups in that order (HARMONY.md 4.1, `group_passes`), each pass followed by its own
backward, so only one pass's activations are alive at a time. A group is split into passes where its
terms read only constant teacher targets, so the gradients are those of one backward per group:
iBOT runs each global view, then the local views in groups of at most one global view's tokens;
MAE runs each global crop. Each pass yields (weighted loss, metrics); a group's metrics are the sum
of its passes'; they are detached tensors, read by the caller at log intervals (no host sync here).

The teachers' outputs are a dict from which each group pops what it reads (every output has one
reader), so nothing a teacher computed outlives its reader. The teacher iBOT head runs its last
layer only where the loss and the centres read: CLS tokens, masked patches, the mean patch.

Ownership (HARMONY.md 3.8): one image student shared by iBOT, CLIP and MAE; one text student
shared by CLIP, MLM and text distillation. `teachers[name]` is the EMA copy of the student module
`self.<name>`: the image teacher (ViT with its contrastive projection, plus the iBOT head) serves
iBOT and the soft CLIP targets; one text teacher serves soft CLIP and text distillation. The MAE
and MLM decoders and the logit scale have no teacher.
"""

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.collectives import all_reduce_sum, gather_with_gradient, rank_and_world_size
from model.decoders import MAEDecoder, MLMDecoder
from model.heads import ibot_head, text_distillation_head
from model.losses import clip_loss, ibot_loss_share, mae_loss, mlm_loss, teacher_probs, text_distillation_loss
from model.masking import MASK_ID, mask_captions, random_keep_indices, real_token_mask
from model.text import TextEncoder
from model.vit import VIT_SIZES, VisionTransformer

BACKWARD_GROUPS = ("ibot", "clip", "text", "mae")  # the official order
NOT_IN_EMA = ("mask_token",)  # the image teacher never masks; its copy of the token is never used
MLM_LOGIT_CHUNKS = 8  # the MLM logits of a step in 8 parts: (n, 49409) floats would be the text group's peak


@dataclass
class HarmonyConfig:
    """Defaults are the paper's ViT-B/16 run (HARMONY.md section 0); switch objectives off for ablations."""

    ibot: bool = True
    clip: bool = True
    soft_clip: bool = True  # soft CLIP targets from the EMA teachers
    mae: bool = True
    mlm: bool = True
    text_distillation: bool = True

    vit_size: str = "base"
    patch_size: int = 16
    global_crop_px: int = 224
    drop_path_rate: float = 0.1  # student only; teachers have none
    clip_dim: int = 512
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    ibot_out_dim: int = 8192
    ibot_head_hidden_dim: int = 2048
    text_distillation_out_dim: int = 2048
    text_distillation_head_hidden_dim: int = 1024
    head_bottleneck_dim: int = 256
    mae_decoder_width: int = 512
    mae_decoder_depth: int = 8
    mae_decoder_heads: int = 16
    mlm_decoder_depth: int = 4
    mlm_decoder_heads: int = 8

    ibot_cls_weight: float = 0.5
    ibot_patch_weight: float = 0.5
    student_temp: float = 0.1
    center_momentum: float = 0.9
    soft_clip_temperature: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    mae_mask_ratio: float = 0.75
    mlm_probability: float = 0.2
    # Recompute each student transformer block (image, text, MAE and MLM decoders) in the backward instead of
    # keeping its activations: less memory, about one more forward of time. Same values.
    activation_checkpointing: bool = False

    ibot_weight: float = 1.0
    clip_weight: float = 1.0
    mlm_weight: float = 1.0
    text_distillation_weight: float = 1.0
    mae_weight: float = 1.0

    def __post_init__(self):
        if self.vit_size not in VIT_SIZES:
            raise ValueError(f"vit_size={self.vit_size!r} is not one of {sorted(VIT_SIZES)}")
        if self.global_crop_px % self.patch_size:
            raise ValueError(f"global_crop_px={self.global_crop_px} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.soft_clip and not self.clip:
            raise ValueError("soft_clip needs clip: set clip=true or soft_clip=false")
        if not any((self.ibot, self.clip, self.mae, self.mlm, self.text_distillation)):
            raise ValueError("every objective is switched off: enable at least one of "
                             "ibot, clip, mae, mlm, text_distillation")

    @property
    def uses_text(self):
        return self.clip or self.mlm or self.text_distillation


class Harmony(nn.Module):
    def __init__(self, config: HarmonyConfig):
        super().__init__()
        self.config = config
        grid = (config.global_crop_px // config.patch_size,) * 2
        self.image_student = VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px,
                                               config.clip_dim, config.drop_path_rate)
        embed_dim = self.image_student.embed_dim
        if config.ibot:
            self.ibot_head = ibot_head(embed_dim, config.ibot_out_dim, config.ibot_head_hidden_dim,
                                       config.head_bottleneck_dim)
            self.register_buffer("ibot_cls_center", torch.zeros(1, config.ibot_out_dim))
            self.register_buffer("ibot_patch_center", torch.zeros(1, 1, config.ibot_out_dim))
        if config.uses_text:
            self.text_student = TextEncoder(config.text_width, config.text_layers, config.text_heads, config.clip_dim)
        if config.clip:
            self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        if config.mae:
            self.mae_decoder = MAEDecoder(embed_dim, grid, config.patch_size, config.mae_decoder_width,
                                          config.mae_decoder_depth, config.mae_decoder_heads)
        if config.mlm:
            self.mlm_decoder = MLMDecoder(MASK_ID + 1, config.text_width, config.mlm_decoder_depth,
                                          config.mlm_decoder_heads)
        if config.text_distillation:
            self.text_distillation_head = text_distillation_head(
                config.text_width, config.text_distillation_out_dim, config.text_distillation_head_hidden_dim,
                config.head_bottleneck_dim)
            self.register_buffer("text_center", torch.zeros(1, 1, config.text_distillation_out_dim))
        self.teachers = self._build_teachers()
        if config.activation_checkpointing:
            self._checkpoint_student_blocks()

    def _build_teachers(self):
        config, teachers = self.config, nn.ModuleDict()
        if config.ibot or config.soft_clip:
            image_teacher = VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px,
                                              config.clip_dim, drop_path_rate=0.0)
            image_teacher.load_state_dict(self.image_student.state_dict())
            teachers["image_student"] = image_teacher
        if config.ibot:
            teachers["ibot_head"] = copy.deepcopy(self.ibot_head)
        if config.soft_clip or config.text_distillation:
            teachers["text_student"] = copy.deepcopy(self.text_student)
        if config.text_distillation:
            teachers["text_distillation_head"] = copy.deepcopy(self.text_distillation_head)
        return teachers.requires_grad_(False)

    def _checkpoint_student_blocks(self):
        """Per-block activation checkpointing in every trained transformer (the teachers run without grad)."""
        for name in ("image_student", "text_student", "mae_decoder", "mlm_decoder"):
            if hasattr(self, name):
                getattr(self, name).set_grad_checkpointing()

    @property
    def backward_groups(self):
        """The enabled groups, in the order their backward passes run."""
        config = self.config
        enabled = {"ibot": config.ibot, "clip": config.clip, "text": config.mlm or config.text_distillation,
                   "mae": config.mae}
        return tuple(group for group in BACKWARD_GROUPS if enabled[group])

    # Parameter sets the trainer needs.

    def ema_pairs(self):
        """(teacher parameters, student parameters), matched by name, for the EMA update."""
        teacher_params, student_params = [], []
        for module_name, teacher in self.teachers.items():
            student = dict(getattr(self, module_name).named_parameters())
            for name, param in teacher.named_parameters():
                if name not in NOT_IN_EMA:
                    teacher_params.append(param)
                    student_params.append(student[name])
        return teacher_params, student_params

    def clipped_parameters(self):
        """Parameters whose gradients are clipped (per parameter): the image student and the iBOT head."""
        modules = [self.image_student] + ([self.ibot_head] if self.config.ibot else [])
        return [param for module in modules for param in module.parameters() if param.requires_grad]

    def last_layer_parameters(self):
        """The iBOT head's output layer, frozen during the first epoch."""
        if not self.config.ibot:
            return []
        return [param for param in self.ibot_head.last_layer.parameters() if param.requires_grad]

    def evaluation_towers(self):
        """(image tower, text tower) for evaluation and export: the EMA teachers where they exist."""
        towers = {name: getattr(self, name, None) for name in ("image_student", "text_student")}
        towers.update(self.teachers.items())
        return towers["image_student"], towers["text_student"]

    # Teachers, once per step.

    @torch.no_grad()
    def forward_teachers(self, global_crops, tokens, ibot_masks):
        """global_crops: (G, B, 3, H, W); tokens: (B, T); ibot_masks: (G, B, H/p, W/p) bool.

        Returns {name: tensor} of what the enabled objectives read, each popped by its one reader:
        ibot_cls (G, B, K), ibot_masked_patches (n, K), ibot_patch_mean (1, 1, K) for iBOT; clip_image and
        clip_text (B, clip_dim), L2-normalized, for soft CLIP; text_features (B, T, width) for text distillation.
        """
        config, outputs = self.config, {}
        if "image_student" in self.teachers:
            image_teacher, batch = self.teachers["image_student"], global_crops.shape[1]
            crops = global_crops if config.ibot else global_crops[:1]  # soft CLIP reads crop 1 only
            image_tokens = image_teacher(crops.flatten(0, 1)).unflatten(0, (crops.shape[0], batch))  # (G, B, 1 + N, D)
            if config.soft_clip:
                cls = image_tokens[0, :, 0]  # (B, D)
                outputs["clip_image"] = F.normalize(cls @ image_teacher.contrastive_projection, dim=-1)
            if config.ibot:
                outputs.update(self._teacher_ibot_logits(image_tokens, ibot_masks.flatten(2)))
        if "text_student" in self.teachers:
            text_embedding, text_features = self.teachers["text_student"](tokens)
            if config.soft_clip:
                outputs["clip_text"] = F.normalize(text_embedding, dim=-1)
            if config.text_distillation:
                outputs["text_features"] = text_features
        return outputs

    def _teacher_ibot_logits(self, image_tokens, masks):
        """The teacher iBOT head where the loss and centres read it, instead of K logits for every patch.

        image_tokens: (G, B, 1 + N, D); masks: (G, B, N). The head's last layer is linear without bias, so the
        patch centre's statistic (the mean logit over every patch) is the last layer of the mean bottleneck."""
        head = self.teachers["ibot_head"]
        bottleneck = head.bottleneck(image_tokens)  # (G, B, 1 + N, bottleneck_dim)
        patches = bottleneck[:, :, 1:]
        return {"ibot_cls": head.last_layer(bottleneck[:, :, 0]),  # (G, B, K)
                "ibot_masked_patches": head.last_layer(patches[masks]),  # (n, K), in masks.nonzero() order
                "ibot_patch_mean": head.last_layer(patches.mean(dim=(0, 1, 2)))[None, None]}  # (1, 1, K)

    # The four backward groups, each in one or more backward passes.

    def group_passes(self, group, global_crops, local_crops, ibot_masks, tokens, teacher, *, teacher_cls_temp,
                     teacher_patch_temp, clip_hard_weight):
        """The backward passes of one group by name: an iterator of (loss, metrics), to be backwarded in turn."""
        if group == "ibot":
            return self.ibot_passes(global_crops, local_crops, ibot_masks, teacher, teacher_cls_temp,
                                    teacher_patch_temp)
        if group == "clip":
            return self.clip_passes(global_crops, tokens, teacher, clip_hard_weight)
        if group == "text":
            return self.text_passes(tokens, teacher, teacher_patch_temp)
        if group == "mae":
            return self.mae_passes(global_crops)
        raise ValueError(f"unknown backward group {group!r}; groups: {BACKWARD_GROUPS}")

    def ibot_passes(self, global_crops, local_crops, ibot_masks, teacher, teacher_cls_temp, teacher_patch_temp):
        """global_crops: (2, B, 3, Hg, Wg); local_crops: (L, B, 3, Hl, Wl); ibot_masks: (2, B, Hg/p, Wg/p).

        One pass per global view (the student head on its CLS and masked patches), then the local views (CLS
        only) in near-equal groups of at most one global view's tokens. The centres are updated once, first."""
        config = self.config
        views, batch, local_views = global_crops.shape[0], global_crops.shape[1], local_crops.shape[0]
        masks = ibot_masks.flatten(2)  # (2, B, N)
        teacher_cls = teacher.pop("ibot_cls")
        cls_probs = teacher_probs(teacher_cls, self.ibot_cls_center, teacher_cls_temp)  # (2, B, K)
        patch_probs = teacher_probs(teacher.pop("ibot_masked_patches"), self.ibot_patch_center[0],
                                    teacher_patch_temp).split(masks.sum(dim=(1, 2)).tolist())  # per view (n_v, K)
        self._update_center(self.ibot_cls_center, teacher_cls.flatten(0, 1).mean(0, keepdim=True), divide_by=None)
        self._update_center(self.ibot_patch_center, teacher.pop("ibot_patch_mean"), divide_by=None)
        cls_pairs = views * (views + local_views - 1)  # (teacher view, other student view) pairs

        def share(student_cls, student_views, masked_patches, view_patch_probs, view_masks):
            loss, stats = ibot_loss_share(student_cls, student_views, masked_patches, cls_probs, view_patch_probs,
                                          view_masks, cls_pairs, config.student_temp, config.ibot_cls_weight,
                                          config.ibot_patch_weight)
            return config.ibot_weight * loss, {**stats, "ibot": loss.detach()}

        for view in range(views):
            tokens = self.image_student(global_crops[view], patch_mask=ibot_masks[view])  # (B, 1 + N, D)
            logits = self.ibot_head(torch.cat([tokens[:, 0], tokens[:, 1:][masks[view]]]))  # (B + n_v, K)
            yield share(logits[None, :batch], (view,), logits[batch:], patch_probs[view], masks[view:view + 1])
        global_tokens = masks.shape[-1] + 1
        local_tokens = (local_crops.shape[-2] // config.patch_size) * (local_crops.shape[-1] // config.patch_size) + 1
        passes = -(-local_views // max(1, global_tokens // local_tokens))  # ceil; 0 without local views
        bounds = [local_views * index // passes for index in range(passes + 1)] if passes else []
        for first, last in itertools.pairwise(bounds):  # near-equal groups
            tokens = self.image_student(local_crops[first:last].flatten(0, 1))  # ((last - first) * B, 1 + n, D)
            cls = self.ibot_head(tokens[:, 0]).unflatten(0, (last - first, batch))  # (views in group, B, K)
            yield share(cls, range(views + first, views + last), None, None, masks[:0])

    def clip_passes(self, global_crops, tokens, teacher, hard_weight):
        """CLIP on global crop 1 and raw captions; soft targets mix in when hard_weight < 1."""
        config = self.config
        image = F.normalize(self.image_student.embed_image(global_crops[0]), dim=-1)  # (B, clip_dim)
        text = F.normalize(self.text_student(tokens)[0], dim=-1)
        teacher_image, teacher_text = teacher.pop("clip_image", None), teacher.pop("clip_text", None)
        soft_targets = None
        if config.soft_clip and hard_weight != 1.0:
            soft_targets = (teacher_image, teacher_text,
                            gather_with_gradient(teacher_image), gather_with_gradient(teacher_text))
        rank, _ = rank_and_world_size()
        loss, stats = clip_loss(image, text, gather_with_gradient(image), gather_with_gradient(text),
                                self.logit_scale, rank, hard_weight, soft_targets, config.soft_clip_temperature)
        stats["clip"] = loss.detach()
        yield config.clip_weight * loss, stats

    def text_passes(self, tokens, teacher, teacher_temp):
        """MLM and text distillation share one student forward on the masked captions (one backward)."""
        config = self.config
        masked_tokens, labels, masked = mask_captions(tokens, config.mlm_probability)
        _, features = self.text_student(masked_tokens)  # (B, T, width), before the final norm
        losses, stats = [], {}
        if config.mlm:
            # Logits at the masked positions only, a chunk at a time: the same loss without the (B, T, 49409) tensor.
            loss, mlm_stats = mlm_loss(self.mlm_decoder(features)[masked], labels[masked], self.mlm_decoder.predict,
                                       MLM_LOGIT_CHUNKS)
            losses.append(config.mlm_weight * loss)
            stats.update(mlm_stats)
        if config.text_distillation:
            with torch.no_grad():
                teacher_tokens = self.teachers["text_distillation_head"](teacher.pop("text_features"))  # (B, T, K)
            loss, distillation_stats = text_distillation_loss(
                self.text_distillation_head(features), teacher_tokens, masked, real_token_mask(tokens),
                self.text_center, teacher_temp, config.student_temp)
            self._update_center(self.text_center, distillation_stats.pop("teacher_token_sum"),
                                divide_by=distillation_stats.pop("teacher_token_count"))
            losses.append(config.text_distillation_weight * loss)
            stats.update(distillation_stats)
        yield sum(losses), stats

    def mae_passes(self, global_crops):
        """MAE on each global crop in its own pass, losses summed over crops (the official code)."""
        config = self.config
        views, batch = global_crops.shape[:2]
        num_patches = (global_crops.shape[-2] // config.patch_size) * (global_crops.shape[-1] // config.patch_size)
        for crop in global_crops:  # (B, 3, H, W)
            keep, removed = random_keep_indices(batch, num_patches, config.mae_mask_ratio, crop.device)
            predictions = self.mae_decoder(self.image_student(crop, keep_indices=keep), keep, num_patches)
            loss, stats = mae_loss(predictions, crop, removed, config.patch_size)
            yield config.mae_weight * loss, {"mae": stats["mae"] / views}  # the metric: the mean over crops

    @torch.no_grad()
    def _update_center(self, center, local_statistic, divide_by):
        """center <- m * center + (1 - m) * statistic averaged over ranks.

        divide_by None: the statistic is a per-rank mean; otherwise it is a sum and divide_by its count."""
        statistic = local_statistic.float().reshape(center.shape)
        if divide_by is None:
            statistic = all_reduce_sum(statistic.clone()) / rank_and_world_size()[1]
        else:
            totals = all_reduce_sum(torch.cat([statistic.flatten(), divide_by.float().reshape(1)]))
            statistic = (totals[:-1] / totals[-1].clamp(min=1.0)).reshape(center.shape)
        momentum = self.config.center_momentum
        center.mul_(momentum).add_(statistic, alpha=1 - momentum)
