"""The teachers' exponential moving average, over parameter lists built once (docs/methods/harmony.md 4.7)."""

import torch


@torch.no_grad()
def update_teachers(teacher_params, student_params, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, in one fused call per list (none: no teachers)."""
    if teacher_params:
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
