"""The collectives the objectives need, as no-ops when torch.distributed is not initialized.

CLIP gathers embeddings from every rank with gradient (torch's autograd-aware all_gather: its
backward sums the gradients of all ranks and returns this rank's slice, as the official
GatherLayer). The centres of iBOT and text distillation average statistics over ranks.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd


def rank_and_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_gradient(tensor):
    """(B, ...) on each rank -> (W*B, ...), rank-major; gradients flow back to every rank."""
    if rank_and_world_size()[1] == 1:
        return tensor
    return torch.cat(dist_autograd.all_gather(tensor), dim=0)


def all_reduce_sum(tensor):
    """Sum over ranks, in place; returns the tensor."""
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_sum_with_gradient(tensor):
    """Sum over ranks, out of place; its backward sums the gradients of all ranks (BarLIP's cross-correlation)."""
    if rank_and_world_size()[1] == 1:
        return tensor
    return dist_autograd.all_reduce(tensor)
