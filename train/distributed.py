"""Process group from torchrun's environment, and the once-per-step gradient average.

NCCL on GPU, gloo on CPU. Gradients accumulate locally over the per-objective backward passes;
`average_gradients` then all-reduces them once, in flat buckets (docs/design.md: one sync per step).
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(timeout_s=600):
    """Join the process group when launched by torchrun (WORLD_SIZE set); otherwise a world of one.

    timeout_s bounds how long a collective waits for a rank that stopped answering: every rank then
    raises instead of hanging."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return World(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank,
                 torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def free_loopback_port():
    """A free TCP port on 127.0.0.1, for MASTER_PORT when spawning ranks on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def close_distributed(failed=False):
    """Leave the process group. After a failure there is no barrier: the other ranks may never reach it,
    and closing our connections makes their pending collectives fail at once instead of hanging."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()  # gloo aborts at exit if a rank leaves early
        dist.destroy_process_group()


def all_ranks_agree(flag, world):
    """True on every rank when `flag` is True on every rank (one all-reduce)."""
    if world.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@torch.no_grad()
def average_gradients(params, world_size):
    """Average .grad over ranks with one all-reduce per bucket of flat gradients; returns bytes reduced."""
    grads = [param.grad for param in params if param.grad is not None]
    if world_size == 1 or not grads:
        return 0
    reduced, bucket, bucket_bytes = 0, [], 0
    for grad in grads:
        bucket.append(grad)
        bucket_bytes += grad.numel() * grad.element_size()
        if bucket_bytes >= BUCKET_BYTES or grad is grads[-1]:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for grad_view, averaged in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                grad_view.copy_(averaged)
            reduced += flat.numel() * flat.element_size()
            bucket, bucket_bytes = [], 0
    return reduced
