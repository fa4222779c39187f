"""Per-iteration schedules (docs/methods/harmony.md 4.4): pure functions of the iteration, tested against their
formulas."""

import math


def cosine(base, final, iteration, total_iterations, warmup_iterations=0, warmup_start=0.0):
    """Linear warm-up from `warmup_start` to `base` (both ends included, as np.linspace in the official code),
    then cosine from `base` to `final` over the remaining iterations; `final` after the end."""
    if iteration < warmup_iterations:
        return warmup_start + (base - warmup_start) * iteration / max(warmup_iterations - 1, 1)
    span = total_iterations - warmup_iterations
    if span <= 0 or iteration >= total_iterations:
        return final
    progress = (iteration - warmup_iterations) / span
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def linear_per_epoch(start, end, epoch, warmup_epochs):
    """Teacher temperatures: linear from start to end over warmup_epochs, stepped per epoch, then end."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / max(warmup_epochs - 1, 1) if warmup_epochs > 1 else end


class Schedules:
    """Every scheduled value of one iteration, from the optimisation config and the run's length."""

    def __init__(self, optim, iterations_per_epoch, global_batch):
        self.optim, self.per_epoch = optim, iterations_per_epoch
        self.total = optim.epochs * iterations_per_epoch
        self.peak_lr = optim.lr * global_batch / 256

    def at(self, iteration):
        optim, epoch = self.optim, iteration // self.per_epoch
        return {
            "lr": cosine(self.peak_lr, optim.min_lr, iteration, self.total, optim.warmup_epochs * self.per_epoch),
            "weight_decay": cosine(optim.weight_decay, optim.weight_decay_end, iteration, self.total),
            "teacher_momentum": cosine(optim.teacher_momentum, optim.teacher_momentum_end, iteration,
                                       self.total),
            "clip_hard_weight": cosine(1.0, optim.clip_hard_weight_end, iteration,
                                       optim.clip_hard_weight_epochs * self.per_epoch),
            "teacher_cls_temp": linear_per_epoch(optim.warmup_teacher_cls_temp, optim.teacher_cls_temp, epoch,
                                                 optim.warmup_teacher_temp_epochs),
            "teacher_patch_temp": linear_per_epoch(optim.warmup_teacher_patch_temp, optim.teacher_patch_temp, epoch,
                                                   optim.warmup_teacher_temp_epochs),
        }
