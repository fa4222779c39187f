"""Bytes each rank sends per training step, by purpose, measured on 2 gloo ranks on 127.0.0.1.

Runs the trainer's step (teachers, the four backward groups, the gradient average, the finiteness
check) for the `demo` preset on synthetic batches, with torch.distributed's collectives wrapped to count
the bytes each rank contributes. The figure that matters: gradient bytes all-reduced per step / the
model's gradient bytes (goal 1.0; the official code wraps the students in DDP and all-reduces every
gradient after each of its 4 backward passes). Feature gathers (CLIP), centre statistics and the
finiteness flag are reported beside it. Writes <out>/communication.json and .png.

    python -m tools.bench.communication --out runs/bench
"""

import argparse
import collections
import contextlib
import json
import os
import tempfile
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.meta_arch import MetaArch
from tools.bench.backward_memory import backward_each_group, synthetic_batch
from train.config import load_config
from train.distributed import average_gradients, free_loopback_port
from train.pretrain import StepFlags

matplotlib.use("Agg")
import matplotlib.pyplot as plt

WORLD_SIZE = 2
COLLECTIVES = ("all_reduce", "all_gather", "all_to_all", "reduce_scatter", "scatter")  # gloo: scatter for all_to_all


def payload_bytes(name, args):
    """Bytes this rank contributes to one collective call."""
    if name == "all_reduce":
        tensors = [args[0]]
    elif name == "all_gather":
        tensors = [args[1]]
    elif name == "scatter":  # scatter(output, inputs or None, source): the source sends the inputs
        tensors = list(args[1] or [])
    else:  # all_to_all(outputs, inputs), reduce_scatter(output, inputs)
        tensors = list(args[1])
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class CollectiveCounter:
    """Counts bytes per (purpose, collective) while installed; `purpose` names the part of the step running."""

    def __init__(self):
        self.bytes = collections.Counter()
        self.purpose = None

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def counting(name, original):
            def collective(*args, **kwargs):
                self.bytes[(self.purpose, name)] += payload_bytes(name, args)
                return original(*args, **kwargs)
            return collective

        for name, original in originals.items():
            setattr(dist, name, counting(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)


def rank_main(rank, port, steps, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    config = load_config("harmony/demo")
    torch.manual_seed(0)
    model = MetaArch(config.model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    inputs = synthetic_batch(config.model, config.data.batch_size // WORLD_SIZE, config.data.local_crop_px,
                             config.data.local_crops_number, "cpu")
    counter = CollectiveCounter()
    with counter.installed():
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            counter.purpose = "objectives (teachers, CLIP gathers, centres)"
            for _part, _saved in backward_each_group(model, inputs):
                pass  # each group's forward and backward ran
            counter.purpose = "gradient average"
            average_gradients(trainable, WORLD_SIZE)
            counter.purpose = "finiteness and stop check"
            StepFlags(torch.zeros(()), False, WORLD_SIZE).read()
    gradient_bytes = sum(param.numel() * param.element_size() for param in trainable)
    if rank == 0:
        per_step = {f"{purpose} / {name}": value / steps for (purpose, name), value in counter.bytes.items()}
        Path(result_path).write_text(json.dumps({
            "world_size": WORLD_SIZE, "steps": steps, "preset": "harmony/demo",
            "groups": list(model.backward_groups), "model_gradient_bytes": gradient_bytes,
            "bytes_sent_per_rank_per_step": per_step}))
    dist.barrier()
    dist.destroy_process_group()


def measure(steps=2):
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        mp.spawn(rank_main, args=(free_loopback_port(), steps, str(result_path)), nprocs=WORLD_SIZE)
        result = json.loads(result_path.read_text())
    per_step = result["bytes_sent_per_rank_per_step"]
    gradient_all_reduce = per_step.get("gradient average / all_reduce", 0)
    result["gradient_bytes_all_reduced_vs_model_gradient_bytes"] = gradient_all_reduce / result["model_gradient_bytes"]
    result["official_ddp_per_backward_vs_model_gradient_bytes"] = len(result["groups"])  # one DDP all-reduce each
    result["other_bytes_vs_model_gradient_bytes"] = ((sum(per_step.values()) - gradient_all_reduce) /
                                                     result["model_gradient_bytes"])
    return result


def plot(result, path):
    figure, axis = plt.subplots(figsize=(6, 2.2))
    model_bytes = result["model_gradient_bytes"]
    axis.barh(["official (DDP per backward)"], [result["official_ddp_per_backward_vs_model_gradient_bytes"]],
              color="#999999")
    axis.barh(["harmony-pipe"], [result["gradient_bytes_all_reduced_vs_model_gradient_bytes"]], label="gradients")
    axis.barh(["harmony-pipe"], [result["other_bytes_vs_model_gradient_bytes"]],
              left=[result["gradient_bytes_all_reduced_vs_model_gradient_bytes"]], label="features, centres, flag")
    axis.set_xlabel(f"bytes sent per rank per step / model gradient bytes ({model_bytes / 2**20:.1f} MiB)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure(args.steps)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "communication.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / "communication.png")
    print(f"bench communication (2 gloo ranks, demo preset): gradient bytes all-reduced per step = "
          f"{result['gradient_bytes_all_reduced_vs_model_gradient_bytes']:.2f}x the model's gradient bytes "
          f"(official: {result['official_ddp_per_backward_vs_model_gradient_bytes']}x); everything else sent = "
          f"{result['other_bytes_vs_model_gradient_bytes']:.3f}x; written to {out_dir / 'communication.json'}")


if __name__ == "__main__":
    main()
