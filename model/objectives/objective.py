"""What an objective is to the meta-architecture (model/meta_arch.py), and the centre update objectives share.

An objective is one module of this package whose class is decorated with `@register`: importing model.objectives
imports every module here, so a new module is found without being listed anywhere. It declares
- `name`: its name in configs, metrics and the order of passes; `enabled(config)`: whether the config switches it
  on (by default the model setting of its name, e.g. `model.simclr`);
- `build_rank` and `pass_rank`: where its networks are built and where its backward passes run among the enabled
  objectives (lower first; the defaults put a new objective last, after every existing one);
- `students`: the shared student networks it trains ("image_student", "text_student");
- `networks(config, model)`: the networks of its own (heads, decoders, scalars), by attribute name, built once:
  two objectives naming the same network share it;
- `buffers(config)`: its state that is not trained (centres), by attribute name;
- `teachers`: the networks whose EMA copy it reads; the meta-architecture builds a teacher only for those;
  `evaluates_students`: the method is evaluated on its students even where both towers have an EMA copy;
- `frozen`: submodules of its networks that keep their initial weights (e.g. "image_student.patch_embed"): their
  parameters get requires_grad=False, so the optimizer leaves them out; they still have their EMA copy and checkpoint;
- `reads`: the views it reads by name (the recipe's image and text views, `tokens` for the one caption); the
  trainer checks that the data recipe makes them before training starts;
- `teacher_image_views`: how many crops of view `teacher_view` the image teacher must see for it (0: none), and
  `teacher_attention`: whether it reads the image teacher's CLS attention map;
- `teacher_outputs(model, seen, views)`: what it reads from the teachers, computed once per step without gradient
  from what the teachers saw (`seen`: image_tokens (G, B, 1 + N, D) of view `teacher_view`, image_attention
  (G, B, N), text_embedding (B, clip_dim), text_features (B, T, width), those that some objective needs), each
  entry popped by this objective's passes;
- `passes(model, views, teacher, values)`: its backward passes, an iterator of (weighted loss, metrics);
- `schedules`: the scheduled values (train/schedules.py) its passes read from `values`; the trainer logs and plots
  only the values some objective reads (besides lr, weight decay, and the EMA momentum where there is a teacher).
The networks and buffers live on the meta-architecture (so `model.ibot_head` is the one iBOT head, and checkpoints
name it so); an objective holds only its configuration.
"""

import torch

from model.collectives import all_reduce_sum, rank_and_world_size

OBJECTIVES = {}  # name -> objective class, filled by `register` as each module of the package is imported


def register(cls):
    """Class decorator: the objective joins OBJECTIVES under its name (timm's @register_model)."""
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.__name__}: its name {cls.name!r} is empty or already registered")
    OBJECTIVES[cls.name] = cls
    return cls


class Objective:
    name = ""  # its backward group in metrics and in the order of passes
    build_rank = pass_rank = 1000
    students = ()
    teachers = ()
    evaluates_students = False
    frozen = ()
    reads = ("global_crops", "tokens")
    teacher_view = "global_crops"
    teacher_image_views = 0
    teacher_attention = False
    schedules = ()

    def __init__(self, config):
        self.config = config

    @classmethod
    def enabled(cls, config):
        return getattr(config, cls.name)

    def networks(self, config, model):
        return {}

    def buffers(self, config):
        return {}

    def teacher_outputs(self, model, seen, views):
        return {}

    def passes(self, model, views, teacher, values):
        raise NotImplementedError(f"objective {self.name!r} yields no backward pass")


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
