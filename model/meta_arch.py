"""The meta-architecture: the students, their EMA teachers, and the objectives a config names (DINOv2's
SSLMetaArch is the model). Each objective (model/objectives/) declares the networks it trains and the teachers it
reads; this class builds each network once, an EMA teacher only where an objective reads one, and runs the
objectives' backward passes in `PASS_ORDER`.

The trainer calls, per step: `forward_teachers` once (no grad), then each enabled objective's passes
(`group_passes`), each pass followed by its own backward, so only one pass's activations are alive at a time
(docs/methods/harmony.md 4.1). Each pass yields (weighted loss, metrics); an objective's metrics are the sum of its
passes'; they are detached tensors, read by the caller at log intervals (no host sync here).

The teachers' outputs are a dict from which each objective pops what it reads (every output has one reader), so
nothing a teacher computed outlives its reader.

Ownership (docs/methods/harmony.md 3.8): one image student shared by every image objective; one text student shared by
every text objective. `teachers[name]` is the EMA copy of the student module `self.<name>`: the image teacher (ViT with
its contrastive projection, plus the iBOT head) serves iBOT and the soft CLIP targets; one text teacher serves soft CLIP
and text distillation; A-CLIP's teacher is the image teacher (on its zoom-out view) plus the EMA BYOL projector.
Decoders and the logit scale have no teacher.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from model.objectives import OBJECTIVES, PASS_ORDER
from model.pooling import POOLINGS
from model.ranges import check_ranges, ranged
from model.text_tower import TextEncoder
from model.vit import VIT_SIZES, VisionTransformer

NOT_IN_EMA = ("mask_token",)  # the image teacher never masks; its copy of the token is never used
CLIP_LOSSES = ("softmax", "sigmoid")
WEIGHT_NOTE = "a loss weight: 0 switches the term off, below 0 would maximise its loss"
MASK_NOTE = "the share of tokens masked"


@dataclass
class ModelConfig:
    """Defaults are Harmony's ViT-B/16 run (docs/methods/harmony.md section 0); a method's preset switches
    objectives on and off."""

    ibot: bool = True  # iBOT: CLS and masked-patch self-distillation against the EMA image teacher
    clip: bool = True  # image-text contrast (CLIP's InfoNCE, or SigLIP's sigmoid loss by clip_loss)
    soft_clip: bool = True  # soft CLIP targets from the EMA teachers
    mae: bool = True  # MAE: the removed patches' pixels predicted from the visible ones
    mlm: bool = True  # masked language modelling through a causal decoder
    text_distillation: bool = True  # masked captions distilled from the EMA text teacher

    vit_size: str = "base"  # the image tower: micro | tiny | small | base | large
    patch_size: int = ranged(16, "[1, inf)")  # ViT patch side, pixels
    # side of the crops the image tower is built for; equal to data.global_crop_px
    global_crop_px: int = ranged(224, "[1, inf)")
    drop_path_rate: float = ranged(0.1, "[0, 1)")  # student only; teachers have none
    clip_dim: int = ranged(512, "[1, inf)")  # width of the shared image-text embedding
    text_width: int = ranged(512, "[1, inf)")  # text transformer's width
    text_layers: int = ranged(12, "[1, inf)")  # text transformer's blocks
    text_heads: int = ranged(8, "[1, inf)")  # text transformer's attention heads

    ibot_out_dim: int = ranged(8192, "[1, inf)")  # iBOT head's output dimension (prototypes)
    ibot_head_hidden_dim: int = ranged(2048, "[1, inf)")  # iBOT head's MLP width
    text_distillation_out_dim: int = ranged(2048, "[1, inf)")  # text-distillation head's output dimension
    text_distillation_head_hidden_dim: int = ranged(1024, "[1, inf)")  # text-distillation head's MLP width
    head_bottleneck_dim: int = ranged(256, "[1, inf)")  # both distillation heads' L2-normalized bottleneck
    mae_decoder_width: int = ranged(512, "[1, inf)")  # MAE decoder's width
    mae_decoder_depth: int = ranged(8, "[1, inf)")  # MAE decoder's blocks
    mae_decoder_heads: int = ranged(16, "[1, inf)")  # MAE decoder's attention heads
    mlm_decoder_depth: int = ranged(4, "[1, inf)")  # MLM decoder's blocks (its width is text_width)
    mlm_decoder_heads: int = ranged(8, "[1, inf)")  # MLM decoder's attention heads

    ibot_cls_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)
    # 0: DINO (no masked views, CLS distillation only)
    ibot_patch_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)
    student_temp: float = ranged(0.1, "(0, inf)")  # students' softmax temperature (iBOT, text distillation)
    center_momentum: float = ranged(0.9, "[0, 1]")  # EMA momentum of the teachers' output centres
    soft_clip_temperature: float = ranged(0.1, "(0, inf)")  # temperature of the teachers' soft CLIP targets
    logit_scale_init: float = ranged(math.log(1 / 0.07), "(-inf, inf)")  # initial log logit scale: log(1 / 0.07)
    mae_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
    mlm_probability: float = ranged(0.2, "(0, 1)", note=MASK_NOTE)
    # Recompute each student transformer block (image, text, MAE and MLM decoders) in the backward instead of
    # keeping its activations: less memory, about one more forward of time. Same values.
    activation_checkpointing: bool = False

    # The image-text objective's variants (docs/methods/clip.md, siglip.md, flip.md).
    clip_loss: str = "softmax"  # softmax: CLIP's InfoNCE; sigmoid: SigLIP
    clip_pooling: str = "cls"  # cls | gap | max | map: what the image tower's CLIP embedding pools
    # FLIP: the share of patches removed at random from the contrastive view
    clip_mask_ratio: float = ranged(0.0, "[0, 1)", note="the share of patches FLIP removes; 0.5 = FLIP")
    clip_label_smoothing: float = ranged(0.0, "[0, 1)")  # label smoothing of CLIP's hard targets
    clip_views: int = ranged(1, "[1, 2]", note="CLIP reads 1 or 2 global crops")  # averaged
    # exp(logit_scale) clamped to [1, this] after every optimizer step; 0 = never
    logit_scale_max: float = ranged(0.0, "[0, inf)")
    logit_bias_init: float = ranged(-10.0, "(-inf, inf)")  # SigLIP's learnable bias b

    # MaskCLIP's masked self-distillation (docs/methods/maskclip.md, Harmony's re-implementation).
    masked_distillation: bool = False
    masked_distillation_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
    masked_distillation_decoder_depth: int = ranged(1, "[1, inf)")  # its decoder's blocks (encoder width)
    masked_distillation_decoder_heads: int = ranged(16, "[1, inf)")  # its decoder's attention heads
    masked_distillation_weight: float = ranged(0.05, "[0, inf)", note=WEIGHT_NOTE)

    # Joint image-text masked autoencoding (M3AE, docs/methods/m3ae.md; MAE-CLIP's generative terms,
    # docs/methods/mae_clip.md).
    multimodal_mae: bool = False
    multimodal_image_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
    multimodal_text_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
    multimodal_norm_pix: bool = False  # M3AE: raw (dataset-normalized) pixels; MAE-CLIP: per-patch normalized
    multimodal_decoder_width: int = ranged(512, "[1, inf)")  # the cross-modal decoder's width
    multimodal_decoder_depth: int = ranged(8, "[1, inf)")  # the cross-modal decoder's blocks
    multimodal_decoder_heads: int = ranged(16, "[1, inf)")  # the cross-modal decoder's attention heads
    multimodal_image_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
    multimodal_text_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)

    # DetailCLIP (docs/methods/detailclip.md): CLIP, iBOT and reconstruction on attention-masked views; its loss weights
    # are clip_weight, mae_weight, ibot_cls_weight and ibot_patch_weight.
    detailclip: bool = False
    # removed in 2x2 blocks by the teacher's attention (100 of 196 patches kept)
    detail_mask_ratio: float = ranged(0.5, "(0, 1)", note=MASK_NOTE)
    detail_decoder_depth: int = ranged(1, "[1, inf)")  # its pixel decoder's blocks
    detail_decoder_heads: int = ranged(16, "[1, inf)")  # its pixel decoder's attention heads

    # SLIP's SimCLR term (docs/methods/slip.md; SLIP's CLIP term is `clip`), whose head and NT-Xent A-CLIP shares.
    simclr: bool = False
    simclr_hidden_dim: int = ranged(4096, "[1, inf)")  # SimCLR head's MLP width
    simclr_out_dim: int = ranged(256, "[1, inf)")  # SimCLR head's output width
    simclr_temperature: float = ranged(0.1, "(0, inf)", note="SLIP, A-CLIP: 0.1")
    simclr_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)

    # A-CLIP (docs/methods/aclip.md): CLIP on two attention-masked views (weight clip_weight for their mean), SimCLR
    # between them (simclr_*) and BYOL against the EMA projector on the zoom-out view.
    aclip: bool = False
    # removed in 2x2 blocks by the teacher's mapped attention (100 of 196 patches kept)
    aclip_mask_ratio: float = ranged(0.5, "(0, 1)", note=MASK_NOTE)
    aclip_freeze_patch_embed: bool = True  # MoCo v3 style: the patch embedding keeps its initial weights
    byol_hidden_dim: int = ranged(4096, "[1, inf)")  # BYOL projector's and predictor's MLP width
    byol_out_dim: int = ranged(256, "[1, inf)")  # BYOL projector's output width
    byol_weight: float = ranged(2.0, "[0, inf)", note=WEIGHT_NOTE)

    # CLIP 🚀 (docs/methods/clip_rocket.md) on the clip_rocket recipe's weak and strong views; its global term uses the
    # towers' CLIP projections (clip_dim), logit_scale_init and logit_scale_max (which clamps rocket_logit_scale too).
    clip_rocket: bool = False
    # the local projectors h: in -> 4096 -> 4096 -> rocket_dim (SyncBN)
    rocket_hidden_dim: int = ranged(4096, "[1, inf)")
    rocket_dim: int = ranged(256, "[1, inf)")  # the local projectors' output width
    rocket_logit_scale_init: float = ranged(math.log(10.0), "(-inf, inf)")  # s_h = 1 / 0.1
    rocket_label_smoothing: float = ranged(0.1, "[0, 1)")  # local term only
    # residual-stream dropout on the strong captions (CC3M 0.2, CC12M 0.05)
    rocket_text_dropout: float = ranged(0.2, "[0, 1)")
    rocket_loss_mode: str = "avg"  # avg (CC3M) | sum (CC12M, YFCC: the loss x2)
    # Its SSL add-ons (docs/methods/siamlip_byolip.md, docs/methods/barlip.md, docs/methods/swalip.md), terms in
    # clip_rocket's pass.
    siamlip: bool = False
    byolip: bool = False  # SiamLIP with EMA targets (optim.teacher_momentum, held by optim.teacher_momentum_end)
    siam_hidden_dim: int = ranged(2048, "[1, inf)")  # SiamLIP/BYOLIP predictor's MLP width
    siam_dim: int = ranged(128, "[1, inf)")  # SiamLIP/BYOLIP projection width
    barlip: bool = False  # BarLIP: cross-modal Barlow Twins, a term in clip_rocket's pass
    barlip_hidden_dim: int = ranged(3000, "[1, inf)")  # its projector's MLP width
    barlip_dim: int = ranged(8192, "[1, inf)")  # its projector's output width
    barlip_scale: float = ranged(0.025, "(0, inf)")  # scale of the whole Barlow Twins loss
    barlip_lambda: float = ranged(5e-3, "[0, inf)", note=WEIGHT_NOTE)  # weight of the off-diagonal terms
    swalip: bool = False  # SwALIP: cross-modal SwAV, a term in clip_rocket's pass
    swalip_weight: float = ranged(0.2, "[0, inf)", note=WEIGHT_NOTE)
    swalip_epsilon: float = ranged(0.05, "(0, inf)")  # Sinkhorn-Knopp's entropy regularisation
    swalip_iterations: int = ranged(3, "[1, inf)")  # Sinkhorn-Knopp iterations

    ibot_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
    clip_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
    mlm_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
    text_distillation_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
    mae_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)

    def __post_init__(self):
        check_ranges(self, "model.")
        if self.vit_size not in VIT_SIZES:
            raise ValueError(f"model.vit_size={self.vit_size!r} is not one of {sorted(VIT_SIZES)}")
        if self.global_crop_px % self.patch_size:
            raise ValueError(f"model.global_crop_px={self.global_crop_px} must be a multiple of patch_size "
                             f"(model.patch_size={self.patch_size})")
        if not self.objectives:
            raise ValueError("every objective is switched off: enable at least one of "
                             "ibot, clip, mae, mlm, text_distillation, masked_distillation, multimodal_mae, "
                             "detailclip, simclr, aclip, clip_rocket")
        self._check_clip()
        self._check_clip_rocket()
        if self.detailclip and (self.ibot or self.clip or self.mae):
            raise ValueError("detailclip holds its own CLIP, iBOT and reconstruction terms: set ibot, clip, soft_clip "
                             "and mae to false next to it")
        if self.detailclip and (self.global_crop_px // self.patch_size) % 2:
            raise ValueError(f"detailclip removes patches in 2x2 blocks: global_crop_px / patch_size = "
                             f"{self.global_crop_px // self.patch_size} must be even")
        self._check_simclr_and_aclip()
        self._check_heads()

    def _check_heads(self):
        """Each enabled transformer's width splits evenly over its attention heads (a transformer's own error would
        come from deep inside it, at the first step)."""
        vit_width = f"the {self.vit_size} ViT's width", VIT_SIZES[self.vit_size].embed_dim
        text_width = "model.text_width", self.text_width
        attentions = [(self.uses_text, text_width, "text_heads"), (self.mae, ("model.mae_decoder_width",
                      self.mae_decoder_width), "mae_decoder_heads"), (self.mlm, text_width, "mlm_decoder_heads"),
                      (self.multimodal_mae, ("model.multimodal_decoder_width", self.multimodal_decoder_width),
                       "multimodal_decoder_heads"),
                      (self.masked_distillation, vit_width, "masked_distillation_decoder_heads"),
                      (self.detailclip, vit_width, "detail_decoder_heads")]
        for enabled, (width_name, width), heads_name in attentions:
            heads = getattr(self, heads_name)
            if enabled and width % heads:
                raise ValueError(f"model.{heads_name}={heads} does not divide {width_name} ({width}): each attention "
                                 f"head takes an equal share of the width; give a number of heads that divides {width}")

    def _check_simclr_and_aclip(self):
        if self.aclip and (self.ibot or self.clip or self.mae or self.simclr or self.detailclip):
            raise ValueError("aclip holds its own CLIP and SimCLR terms and its image teacher sees the enclosing view: "
                             "set ibot, clip, soft_clip, mae, simclr and detailclip to false next to it")
        if self.aclip and (self.global_crop_px // self.patch_size) % 2:
            raise ValueError(f"aclip removes patches in 2x2 blocks: global_crop_px / patch_size = "
                             f"{self.global_crop_px // self.patch_size} must be even")

    def _check_clip(self):
        if self.clip_loss not in CLIP_LOSSES:
            raise ValueError(f"model.clip_loss={self.clip_loss!r} is not one of {CLIP_LOSSES}")
        if self.clip_pooling not in POOLINGS:
            raise ValueError(f"model.clip_pooling={self.clip_pooling!r} is not one of {POOLINGS}")
        if 0 < self.logit_scale_max < 1:
            raise ValueError(f"model.logit_scale_max={self.logit_scale_max}: 0 (never clamp) or at least 1 (e.g. 100)")
        if self.soft_clip and not self.clip:
            raise ValueError("soft_clip needs clip: set clip=true or soft_clip=false")
        if self.soft_clip and self.clip_loss == "sigmoid":
            raise ValueError("soft_clip targets are softmax distributions and clip_loss=sigmoid (SigLIP) has none: "
                             "set soft_clip=false or clip_loss=softmax")
        if self.clip_label_smoothing and self.clip_loss == "sigmoid":
            raise ValueError("clip_label_smoothing smooths softmax targets: set it to 0 with clip_loss=sigmoid")
        if self.soft_clip and self.clip_views != 1:
            raise ValueError("soft_clip reads the teachers on global crop 1 only: set clip_views=1 or soft_clip=false")

    def _check_clip_rocket(self):
        add_ons = [name for name in ("siamlip", "byolip", "barlip", "swalip") if getattr(self, name)]
        if add_ons and not self.clip_rocket:
            raise ValueError(f"{', '.join(add_ons)} add to CLIP 🚀's pass and read its features: "
                             f"set clip_rocket=true")
        if self.siamlip and self.byolip:
            raise ValueError("byolip is siamlip with EMA targets: set one of siamlip and byolip to false")
        if self.rocket_loss_mode not in ("avg", "sum"):
            raise ValueError(f"model.rocket_loss_mode={self.rocket_loss_mode!r}: choose avg (CC3M) or sum "
                             f"(CC12M, YFCC)")
        if self.swalip and self.rocket_label_smoothing:
            raise ValueError(f"swalip trains CLIP 🚀 without label smoothing (rocket_label_smoothing="
                             f"{self.rocket_label_smoothing}): set rocket_label_smoothing=0")
        if self.clip_rocket and (self.ibot or self.clip or self.mae or self.detailclip):
            raise ValueError("clip_rocket holds its own CLIP terms on its own views: set ibot, clip, soft_clip, mae "
                             "and detailclip to false next to it")

    @property
    def objectives(self):
        """The enabled objectives' names, in the order their backward passes run."""
        return tuple(name for name in PASS_ORDER if OBJECTIVES[name].enabled(self))

    @property
    def uses_text(self):
        return (self.clip or self.mlm or self.text_distillation or self.multimodal_mae or self.detailclip
                or self.aclip or self.clip_rocket)

    @property
    def vit_embed_dim(self):
        return VIT_SIZES[self.vit_size].embed_dim

    @property
    def global_views(self):
        """How many global crops the objectives read (the data recipe makes 2 where any reads more than 1)."""
        return 2 if (self.ibot or self.mae or self.detailclip or self.clip_views == 2) else 1


class MetaArch(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        enabled = set(config.objectives)
        self.objectives = {name: objective(config) for name, objective in OBJECTIVES.items() if name in enabled}
        for objective in self.objectives.values():
            for student in objective.students:
                if not hasattr(self, student):
                    setattr(self, student, self._build_student(student))
            for name, build in objective.networks(config, self).items():
                if not hasattr(self, name):
                    setattr(self, name, build())
            for name, tensor in objective.buffers(config).items():
                if not hasattr(self, name):
                    self.register_buffer(name, tensor)
        for objective in self.objectives.values():
            for name in objective.frozen:
                self.get_submodule(name).requires_grad_(False)
        self.teachers = self._build_teachers()
        if config.activation_checkpointing:
            self._checkpoint_student_blocks()

    def _build_student(self, name):
        config = self.config
        if name == "image_student":
            return VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px, config.clip_dim,
                                     config.drop_path_rate, pooling=config.clip_pooling)
        return TextEncoder(config.text_width, config.text_layers, config.text_heads, config.clip_dim)

    def _build_teachers(self):
        """An EMA copy of each network some objective reads the teacher of, in the objectives' order."""
        config, teachers = self.config, nn.ModuleDict()
        for objective in self.objectives.values():
            for name in objective.teachers:
                if name in teachers:
                    continue
                if name == "image_student":  # the teacher has no drop path
                    teachers[name] = VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px,
                                                       config.clip_dim, drop_path_rate=0.0,
                                                       pooling=config.clip_pooling)
                    teachers[name].load_state_dict(self.image_student.state_dict())
                else:
                    teachers[name] = copy.deepcopy(getattr(self, name))
        return teachers.requires_grad_(False)

    def _checkpoint_student_blocks(self):
        """Per-block activation checkpointing in every trained transformer (the teachers run without grad)."""
        for name, module in self.named_children():
            if name != "teachers" and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing()

    @property
    def backward_groups(self):
        """The enabled objectives, in the order their backward passes run."""
        return self.config.objectives

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
        modules = [getattr(self, name) for name in ("image_student", "ibot_head") if hasattr(self, name)]
        return [param for module in modules for param in module.parameters() if param.requires_grad]

    def last_layer_parameters(self):
        """The iBOT head's output layer, frozen during the first epoch."""
        if not hasattr(self, "ibot_head"):
            return []
        return [param for param in self.ibot_head.last_layer.parameters() if param.requires_grad]

    def evaluation_towers(self):
        """(image tower, text tower) for evaluation and export: the EMA teachers where every tower the model has
        has one (Harmony) and no objective says otherwise (BYOLIP's copy only gives targets); otherwise the
        students, which the contrastive loss trained together (an EMA image tower beside a student text tower,
        as A-CLIP's and DetailCLIP's teachers would give, was never trained against that text tower)."""
        names = [name for name in ("image_student", "text_student") if hasattr(self, name)]
        by_teachers = not any(objective.evaluates_students for objective in self.objectives.values())
        source = self.teachers if by_teachers and all(name in self.teachers for name in names) else {}
        towers = {name: source[name] if name in source else getattr(self, name, None)
                  for name in ("image_student", "text_student")}
        return towers["image_student"], towers["text_student"]

    @torch.no_grad()
    def after_optimizer_step(self):
        """Clamp the logit scales (CLIP's; CLIP 🚀's second one) to [0, log logit_scale_max] (SLIP, A-CLIP,
        DetailCLIP, clip-rocket); 0 = never."""
        if self.config.logit_scale_max > 0:
            for name in ("logit_scale", "rocket_logit_scale"):
                if hasattr(self, name):
                    getattr(self, name).clamp_(0.0, math.log(self.config.logit_scale_max))

    # Teachers, once per step.

    @property
    def scheduled_values(self):
        """The scheduled values a step uses, by name: the optimizer's, the EMA momentum where there is a teacher,
        and those the enabled objectives read."""
        names = ["lr", "weight_decay", *(["teacher_momentum"] if len(self.teachers) else [])]
        return tuple(dict.fromkeys(names + [name for objective in self.objectives.values()
                                            for name in objective.schedules]))

    @property
    def reads(self):
        """The views the enabled objectives read, by name (the data recipe must make each)."""
        return tuple(dict.fromkeys(name for objective in self.objectives.values() for name in objective.reads))

    @torch.no_grad()
    def forward_teachers(self, views):
        """views: the step's inputs by name (`group_passes`). Each teacher runs once, on what its readers need;
        returns {name: tensor} of what the enabled objectives read, each popped by its one reader."""
        objectives = [objective for objective in self.objectives.values() if objective.teacher_image_views]
        image_views = max((objective.teacher_image_views for objective in objectives), default=0)
        teacher_views = {objective.teacher_view for objective in objectives}
        if len(teacher_views) > 1:
            raise ValueError(f"the enabled objectives need the image teacher on the views {sorted(teacher_views)}; "
                             f"it sees one view per step")
        seen = {}
        if image_views:
            crops = views[teacher_views.pop()][:image_views].flatten(0, 1)  # (G*B, 3, H, W)
            if any(objective.teacher_attention for objective in objectives):
                image_tokens, attention = self.teachers["image_student"].forward_with_attention(crops)
                seen["image_attention"] = attention.unflatten(0, (image_views, -1))  # (G, B, N)
            else:
                image_tokens = self.teachers["image_student"](crops)
            seen["image_tokens"] = image_tokens.unflatten(0, (image_views, -1))  # (G, B, 1 + N, D)
        if "text_student" in self.teachers and "tokens" in views:  # the one caption (BYOLIP's teacher reads its own)
            seen["text_embedding"], seen["text_features"] = self.teachers["text_student"](views["tokens"])
        outputs = {}
        for objective in self.objectives.values():
            outputs.update(objective.teacher_outputs(self, seen, views))
        return outputs

    def group_passes(self, group, views, teacher, **values):
        """The backward passes of one objective by name: an iterator of (loss, metrics), to be backwarded in turn.

        views: the step's inputs by name (train/step_inputs.py `model_views`): each image view (n, B, 3, H, W), each
        text view (n, B, T), `<view>_boxes` (n, B, 4) where the recipe keeps boxes; with Harmony's and CLIP's recipes
        also `local_crops` (L, B, 3, h, w), `ibot_masks` (G, B, H/p, W/p) and `tokens` (B, T), the one caption.
        values: the step's scheduled values (teacher temperatures, CLIP hard weight, ...)."""
        if group not in self.objectives:
            raise ValueError(f"unknown or disabled objective {group!r}; enabled: {self.backward_groups}")
        return self.objectives[group].passes(self, views, teacher, values)
