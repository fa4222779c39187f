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

import torch
from torch import nn

from model.model_config import ModelConfig
from model.objectives import OBJECTIVES
from model.text_tower import TextEncoder
from model.vit import VisionTransformer

NOT_IN_EMA = ("mask_token",)  # the image teacher never masks; its copy of the token is never used
__all__ = ["MetaArch", "ModelConfig"]


class MetaArch(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        built = config.built_objectives()
        self.objectives = {name: built[name] for name in OBJECTIVES if name in built}  # in the order networks build
        for objective in self.objectives.values():
            for student in objective.students:
                if not hasattr(self, student):
                    setattr(self, student, self._build_student(student))
            for name, build in objective.networks(self).items():
                if not hasattr(self, name):
                    setattr(self, name, build())
            for name, tensor in objective.buffers().items():
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
        return tuple(self.config.objectives)

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

    def _trainable_in(self, names):
        """The trainable parameters of the submodules `names` (dotted, each once), those the model has."""
        modules = [self.get_submodule(name) for name in dict.fromkeys(names) if hasattr(self, name.split(".")[0])]
        return [param for module in modules for param in module.parameters() if param.requires_grad]

    def clipped_parameters(self):
        """Parameters whose gradients are clipped (per parameter): the image student's and those of the networks
        the objectives name (the iBOT head)."""
        return self._trainable_in(["image_student", *(name for objective in self.objectives.values()
                                                      for name in objective.clipped)])

    def last_layer_parameters(self):
        """Parameters frozen during the first optim.freeze_last_layer_epochs epochs (the iBOT head's output layer)."""
        return self._trainable_in([name for objective in self.objectives.values()
                                   for name in objective.frozen_first_epochs])

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
        """Each objective's step hook (clamping its logit scales)."""
        for objective in self.objectives.values():
            objective.after_step(self)

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
