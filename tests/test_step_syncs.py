"""The step's bookkeeping in few launches and few host reads: per-parameter clipping, the step's flags."""

import pytest
import torch

from train.pretrain import clip_per_parameter, step_flags


def clip_one_parameter_at_a_time(grads, max_norm):
    """The per-parameter loop the trainer's clipping replaces: three small ops and a multiply per parameter."""
    for grad in grads:
        grad.mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(grad) + 1e-6), max=1.0))


def test_clipping_all_parameters_at_once_equals_the_per_parameter_loop():
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (3, 3, 8, 8), (1,), (200,), (16, 16)]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for number, param in enumerate(params):  # some gradients above the bound, some below
        param.grad = torch.randn(param.shape, generator=generator) * (0.01 if number % 2 else 10.0)
    expected = [param.grad.clone() for param in params]
    clip_one_parameter_at_a_time(expected, max_norm=3.0)
    params.append(torch.nn.Parameter(torch.zeros(4)))  # one without a gradient is left alone
    clip_per_parameter(params, max_norm=3.0)
    assert params[-1].grad is None
    for param, grad in zip(params, expected, strict=False):
        assert torch.equal(param.grad, grad)
    assert any(torch.linalg.vector_norm(grad) < 1 for grad in expected)  # both sides of the bound were tried
    assert all(torch.linalg.vector_norm(grad) <= 3.0 + 1e-4 for grad in expected)


@pytest.mark.parametrize("loss, stop_requested, expected", [(1.5, False, (True, False)), (1.5, True, (True, True)),
                                                           (float("nan"), False, (False, False)),
                                                           (float("inf"), True, (False, True))])
def test_step_flags_say_whether_the_loss_is_finite_and_a_stop_was_asked(loss, stop_requested, expected):
    for dtype in (torch.float32, torch.bfloat16):
        assert step_flags(torch.tensor(loss, dtype=dtype), stop_requested, world_size=1) == expected
