"""What an objective is to the meta-architecture (model/meta_arch.py), and the pieces objectives share.

An objective is one module of this package whose class is decorated with `@register`: importing model.objectives
imports every module here, so a new module is found without being listed anywhere. A config enables an objective by
naming it under `model.objectives` with its settings (`model.objectives.clip.weight=2`). The class declares
- `name`: its name in configs, metrics and the order of passes;
- `Settings`: a dataclass of its settings with their defaults, numeric ones `ranged` (model/ranges.py, checked as
  `model.objectives.<name>.<setting>`), and `check(settings, model_config)`: its other checks, which may read the
  towers and the other enabled objectives' settings (`model_config.objectives`); each raises a one-line ValueError;
- `requires` and `excludes`: objectives that must be enabled with it, and those it replaces or cannot run with;
- `build_rank` and `pass_rank`: where its networks are built and where its backward passes run among the enabled
  objectives (lower first; the defaults put a new objective last, after every existing one);
- `students`: the shared student networks it trains ("image_student", "text_student");
- `global_views`: how many global crops it reads (the data recipe makes 2 where any objective reads more than 1);
- `networks(model)`: the networks of its own (heads, decoders, scalars), by attribute name, built once: two
  objectives naming the same network share it;
- `buffers()`: its state that is not trained (centres), by attribute name;
- `teachers`: the networks whose EMA copy it reads; the meta-architecture builds a teacher only for those;
  `evaluates_students`: the method is evaluated on its students even where both towers have an EMA copy;
- `frozen`: submodules of its networks that keep their initial weights (e.g. "image_student.patch_embed"): their
  parameters get requires_grad=False, so the optimizer leaves them out; they still have their EMA copy and checkpoint;
- `clipped`: its networks whose gradients `optim.clip_grad` clips, per parameter (the image student's always are);
- `frozen_first_epochs`: its submodules trained only after `optim.freeze_last_layer_epochs` epochs;
- `reads`: the views it reads by name (the recipe's image and text views, `tokens` for the one caption); the
  trainer checks that the data recipe makes them before training starts;
- `teacher_image_views`: how many crops of view `teacher_view` the image teacher must see for it (0: none), and
  `teacher_attention`: whether it reads the image teacher's CLS attention map;
- `teacher_outputs(model, seen, views)`: what it reads from the teachers, computed once per step without gradient
  from what the teachers saw (`seen`: image_tokens (G, B, 1 + N, D) of view `teacher_view`, image_attention
  (G, B, N), text_embedding (B, clip_dim), text_features (B, T, width), those that some objective needs), each
  entry popped by this objective's passes;
- `passes(model, views, teacher, values)`: its backward passes, an iterator of (weighted loss, metrics);
- `after_step(model)`: what it does after each optimizer step (clamping its logit scale);
- `schedules`: the scheduled values (train/schedules.py) its passes read from `values`; the trainer logs and plots
  only the values some objective reads (besides lr, weight decay, and the EMA momentum where there is a teacher);
- `attention_heads()`: (heads setting, heads, width name, width) of each attention it builds, checked to divide.
An objective instance holds its settings (`self.settings`) and the model's config (`self.model_config`: the towers,
and every enabled objective's settings). The networks and buffers live on the meta-architecture (so
`model.ibot_head` is the one iBOT head, and checkpoints name it so).
"""

import math
from dataclasses import dataclass

import torch

from model.collectives import all_reduce_sum, rank_and_world_size

REGISTRY = {}  # name -> objective class, filled by `register` as each module of the package is imported
WEIGHT_NOTE = "a loss weight: 0 switches the term off, below 0 would maximise its loss"
MASK_NOTE = "the share of tokens masked"


def register(cls):
    """Class decorator: the objective joins REGISTRY under its name (timm's @register_model)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"objective {cls.__name__}: its name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class NoSettings:
    """An objective without settings."""


class Objective:
    name = ""  # its backward group in metrics and in the order of passes
    Settings = NoSettings
    requires = ()
    excludes = ()
    build_rank = pass_rank = 1000
    students = ()
    global_views = 0
    teachers = ()
    evaluates_students = False
    frozen = ()
    clipped = ()
    frozen_first_epochs = ()
    reads = ("global_crops", "tokens")
    teacher_view = "global_crops"
    teacher_image_views = 0
    teacher_attention = False
    schedules = ()

    def __init__(self, settings, model_config):
        self.settings = settings
        self.model_config = model_config

    @classmethod
    def check(cls, settings, model_config):
        """Raise a one-line ValueError where `settings` cannot run with the towers or the other objectives."""

    def networks(self, model):
        return {}

    def buffers(self):
        return {}

    def attention_heads(self):
        return []

    def teacher_outputs(self, model, seen, views):
        return {}

    def passes(self, model, views, teacher, values):
        raise NotImplementedError(f"objective {self.name!r} yields no backward pass")

    def after_step(self, model):
        """After each optimizer step (no grad)."""


def clamp_logit_scales(model, names, logit_scale_max):
    """Clamp the log logit scales `names` of `model` to [0, log logit_scale_max]; 0 = never (SLIP's clamp)."""
    if logit_scale_max > 0:
        for name in names:
            getattr(model, name).clamp_(0.0, math.log(logit_scale_max))


def check_logit_scale_max(name, logit_scale_max):
    if 0 < logit_scale_max < 1:
        raise ValueError(f"model.objectives.{name}.logit_scale_max={logit_scale_max}: 0 (never clamp) or at least 1 "
                         f"(e.g. 100)")


def check_even_grid(name, model_config):
    """Objectives that remove patches in 2x2 blocks need an even patch grid."""
    grid = model_config.global_crop_px // model_config.patch_size
    if grid % 2:
        raise ValueError(f"{name} removes patches in 2x2 blocks: model.global_crop_px / model.patch_size = {grid} "
                         f"must be even")


def patch_grid(model_config):
    """(rows, columns) of patches of a global crop."""
    return (model_config.global_crop_px // model_config.patch_size,) * 2


@torch.no_grad()
def update_center(center, local_statistic, momentum, divide_by=None):
    """center <- m * center + (1 - m) * statistic averaged over ranks.

    divide_by None: the statistic is a per-rank mean; otherwise it is a sum and divide_by its count."""
    statistic = local_statistic.float().reshape(center.shape)
    if divide_by is None:
        statistic = all_reduce_sum(statistic.clone()) / rank_and_world_size()[1]
    else:
        totals = all_reduce_sum(torch.cat([statistic.flatten(), divide_by.float().reshape(1)]))
        statistic = (totals[:-1] / totals[-1].clamp(min=1.0)).reshape(center.shape)
    center.mul_(momentum).add_(statistic, alpha=1 - momentum)
