"""A comparison's budget, and each method's steps under it.

    epochs:8            every method trains 8 epochs (as the papers' main tables)
    flops:3e14          every method trains until it has spent 3e14 training FLOPs
    flops:harmony@8     ... as many FLOPs as harmony spends in 8 epochs (Harmony's Table 5, equal compute)
    time:600            every method trains for 600 s on this machine (also 10m, 2h)

FLOPs are measured by the model, not estimated: torch's FlopCounterMode counts the matmuls, convolutions and
attention (math kernel) of real training steps (teachers' forwards, every loss's forward and backward),
averaged over MEASURED_STEPS steps, so a budget means the same on any machine. For a time budget, the
seconds per step are measured on TIMED_STEPS further steps at the start and fixed in the comparison's
plan, so a continued comparison trains the same steps. A FLOPs or time budget is a number of steps; each
method's schedules span the whole epochs those steps begin (the last may be cut short).
"""

import math
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train.distributed import init_distributed
from train.pretrain import Trainer

MEASURED_STEPS = 2
TIMED_STEPS = 3
KINDS = ("epochs", "flops", "time")
TIME_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Budget:
    kind: str  # epochs | flops | time
    amount: float = 0.0  # epochs, FLOPs or seconds; 0 while `reference` is to be measured
    reference: str = ""  # flops:<method>@<epochs>: the method whose FLOPs in `reference_epochs` set the amount
    reference_epochs: int = 0

    def __str__(self):
        if self.reference:
            return f"{self.kind}:{self.reference}@{self.reference_epochs}"
        return f"{self.kind}:{self.amount:g}"


def parse(text):
    """A Budget from `epochs:N`, `flops:X`, `flops:<method>@<epochs>` or `time:S[s|m|h]`."""
    kind, _, value = text.partition(":")
    hint = "BUDGET is epochs:N, flops:X (e.g. 3e14), flops:<method>@<epochs> or time:<seconds>[s|m|h]"
    try:
        if kind == "epochs" and value.isdigit() and int(value) > 0:
            return Budget("epochs", int(value))
        if kind == "flops" and (match := re.fullmatch(r"([\w-]+)@(\d+)", value)) and int(match[2]) > 0:
            return Budget("flops", 0.0, match[1], int(match[2]))
        if kind == "flops" and float(value) > 0:
            return Budget("flops", float(value))
        if kind == "time" and (match := re.fullmatch(r"([\d.]+)([smh]?)", value)) and float(match[1]) > 0:
            return Budget("time", float(match[1]) * TIME_UNITS_S[match[2]])
    except ValueError:
        pass
    raise ValueError(f"BUDGET={text!r}: {hint}")


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(config, timed_steps=TIMED_STEPS):
    """{flops_per_step, seconds_per_step (None if timed_steps is 0), steps_per_epoch, global_batch} of real
    training steps of `config` (a throwaway trainer: its run folder is not touched)."""
    world = init_distributed(config.run.collective_timeout_s)
    trainer = Trainer(config, world)
    batches, values = _batches(trainer.loader), trainer.schedules.at(0)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        for _ in range(MEASURED_STEPS):
            trainer.train_step(next(batches), values)
    seconds = []
    for _ in range(timed_steps):
        batch = next(batches)
        started = time.perf_counter()
        trainer.train_step(batch, values)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    measured = {"flops_per_step": counter.get_total_flops() / MEASURED_STEPS,
                "seconds_per_step": statistics.median(seconds) if seconds else None,
                "steps_per_epoch": len(trainer.loader), "global_batch": config.data.batch_size * world.world_size}
    del trainer, batches
    if world.device.type == "cuda":
        torch.cuda.empty_cache()  # the comparison goes on in this process: the GPU is the trainers' again
    return measured


def flops_amount(budget, measured):
    """The budget's FLOPs: its own amount, or its reference method's FLOPs in its reference epochs."""
    if not budget.reference:
        return budget.amount
    if budget.reference not in measured:
        raise ValueError(f"BUDGET={budget}: {budget.reference} is not among the methods measured "
                         f"({', '.join(measured)}); name a method of the comparison")
    reference = measured[budget.reference]
    return reference["flops_per_step"] * reference["steps_per_epoch"] * budget.reference_epochs


def steps_and_epochs(budget, measurement, measured):
    """(steps, epochs) of one method (its `measurement`) under `budget`; `measured`: every method's."""
    per_epoch = measurement["steps_per_epoch"]
    if budget.kind == "epochs":
        return int(budget.amount) * per_epoch, int(budget.amount)
    if budget.kind == "flops":
        steps = int(flops_amount(budget, measured) // measurement["flops_per_step"])
    else:
        steps = int(budget.amount // measurement["seconds_per_step"])
    if steps < 1:
        cost = f"{measurement['flops_per_step']:.3g} FLOPs" if budget.kind == "flops" \
            else f"{measurement['seconds_per_step']:.2f} s"
        raise ValueError(f"BUDGET={budget} is less than one training step of this method ({cost})")
    return steps, math.ceil(steps / per_epoch)
