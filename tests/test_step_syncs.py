"""The step's bookkeeping in few launches and few host reads: per-parameter clipping, the step's flags, the
fused optimizer skipping a non-finite step on the device."""

from dataclasses import replace

import pytest
import torch

from tools.gpu.profile import TINY_OVERRIDES, first_batches
from train.config import load_config
from train.distributed import World
from train.pretrain import StepFlags, Trainer, clip_per_parameter


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
        flags = StepFlags(torch.tensor(loss, dtype=dtype), stop_requested, world_size=1)
        assert flags.read() == expected and flags.nonfinite == float(not expected[0])


def test_a_nonfinite_step_skipped_by_the_fused_optimizer_on_the_device_equals_the_host_skip(demo_shards, monkeypatch):
    """The fused AdamW (the GPU's) is launched before the host reads the step's flags and skips a non-finite step
    itself: parameters and optimizer state end as when the host skips it. Here on the CPU's fused AdamW."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *arguments, **options: adamw(*arguments, **{**options,
                                                                                            "fused": True}))
    config = load_config("clip/demo", [f"data.shards={demo_shards['train']}", *TINY_OVERRIDES])
    results = []
    for skips_on_device in (True, False):
        trainer = Trainer(config, World(0, 1, 0, torch.device("cpu")))
        assert trainer.skips_on_device
        trainer.skips_on_device = skips_on_device
        finite, other = first_batches(trainer.loader, 2)
        nonfinite = replace(finite, images={"global_crops": finite.global_crops * float("nan")})
        torch.manual_seed(1)
        applied = [trainer.train_step(batch, trainer.schedules.at(step))[1]
                   for step, batch in enumerate((finite, nonfinite, other))]
        results.append((applied, trainer.model.state_dict(), trainer.optimizer.state_dict()["state"]))
    (applied_on_device, model_on_device, state_on_device), (applied_on_host, model_on_host, state_on_host) = results
    assert applied_on_device == applied_on_host == [True, False, True]
    for name, tensor in model_on_host.items():
        assert torch.equal(model_on_device[name], tensor), name
    for number, state in state_on_host.items():
        for name, tensor in state.items():
            assert torch.equal(state_on_device[number][name], tensor), (number, name)
