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

import difflib
import math
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datapipe.load.loader import batches_per_epoch
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


HINT = "BUDGET is epochs:N, flops:X (e.g. 3e14), flops:<method>@<epochs> or time:<seconds>[s|m|h] (e.g. 1e3, 10m)"
UNITS = {"epochs": "epochs", "flops": "FLOPs", "time": "seconds"}


def _positive_number(text, kind, budget_text):
    """The finite number above 0 written `text` (600, 2.5, 3e14: the same syntax for every kind)."""
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"BUDGET={budget_text!r}: {text!r} is not a number; {HINT}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"BUDGET={budget_text!r}: {UNITS[kind]} must be a finite number above 0, not {text!r}; "
                         f"{HINT}")
    return number


def _whole_epochs(text, budget_text):
    epochs = _positive_number(text, "epochs", budget_text)
    if not epochs.is_integer():
        raise ValueError(f"BUDGET={budget_text!r}: epochs must be a whole number of 1 or more, not {text!r}; {HINT}")
    return int(epochs)


def parse(text):
    """A Budget from `epochs:N`, `flops:X`, `flops:<method>@<epochs>` or `time:S[s|m|h]`; every number a finite
    one above 0 in Python's float syntax (8, 2.5, 3e14), epochs whole."""
    kind, _, value = text.partition(":")
    if kind == "epochs":
        return Budget("epochs", _whole_epochs(value, text))
    if kind == "flops" and (match := re.fullmatch(r"([A-Za-z_][\w-]*)@(.+)", value)):
        return Budget("flops", 0.0, match[1], _whole_epochs(match[2], text))
    if kind == "flops":
        return Budget("flops", _positive_number(value, kind, text))
    if kind == "time":
        number, unit = re.fullmatch(r"(.*?)([smh]?)", value).groups()
        return Budget("time", _positive_number(number, kind, text) * TIME_UNITS_S[unit])
    raise ValueError(f"BUDGET={text!r}: {HINT}")


def check_reference(budget, methods):
    """Refuse flops:<method>@<epochs> whose method is not among `methods`, before anything is measured."""
    if budget.reference and budget.reference not in methods:
        close = difflib.get_close_matches(budget.reference, methods, n=3)
        guess = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"BUDGET={budget}: {budget.reference} is not among the comparison's methods "
                         f"({', '.join(methods)}){guess}")


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(config, timed_steps=TIMED_STEPS, ranks=1):
    """{flops_per_step, seconds_per_step (None if timed_steps is 0), steps_per_epoch, global_batch} of real
    training steps of `config` (a throwaway trainer: its run folder is not touched), for a job of `ranks` ranks:
    one rank's step is measured here, the job's FLOPs per step are `ranks` times its FLOPs (the same per-rank batch
    on every rank), its step takes the time of one rank's, and an epoch has the job's steps."""
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
    measured = {"flops_per_step": ranks * counter.get_total_flops() / MEASURED_STEPS,
                "seconds_per_step": statistics.median(seconds) if seconds else None,
                "steps_per_epoch": batches_per_epoch(trainer.loader.shards.total, ranks, config.data.batch_size),
                "global_batch": config.data.batch_size * ranks}
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


def step_costs(budget, measured):
    """{method: FLOPs or seconds of one training step} of the measured methods, in the budget's kind."""
    key = "flops_per_step" if budget.kind == "flops" else "seconds_per_step"
    return {method: measurement[key] for method, measurement in measured.items()}


def check_one_step_each(budget, measured):
    """Refuse a FLOPs or time budget that is less than one training step of any measured method, naming the
    least budget that trains every one (one step of the costliest). A budget whose reference method was not
    measured is left to each method's steps_and_epochs."""
    if budget.kind == "epochs" or (budget.reference and budget.reference not in measured) or not measured:
        return
    costs = step_costs(budget, measured)
    amount = flops_amount(budget, measured)  # a time budget's own amount
    short = [method for method, cost in costs.items() if amount < cost]
    if short:
        costliest = max(costs, key=costs.get)
        unit = UNITS[budget.kind]
        raise ValueError(f"BUDGET={budget}: {amount:.3g} {unit} is less than one training step of "
                         f"{', '.join(short)}; the budget must be at least {costs[costliest]:.3g} {unit} (one step "
                         f"of {costliest}, the costliest method)")
