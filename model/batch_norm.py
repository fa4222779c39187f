"""Batch normalisation over the global batch: SyncBatchNorm's statistics, on every backend.

The SSL heads of SLIP, A-CLIP and the CLIP 🚀 family normalise with SyncBN (docs/methods/slip.md, docs/methods/aclip.md,
docs/methods/clip_rocket.md, docs/methods/siamlip_byolip.md, docs/methods/barlip.md), whose batch statistics are those
of every rank's samples together. torch.nn.SyncBatchNorm runs on GPUs only; this one sums each rank's per-channel count,
sum and sum of squares with an autograd-aware all-reduce (its backward sums the gradients of all ranks), so on any
number of gloo or NCCL ranks it computes what one rank with the whole batch would. On one rank, or in eval mode, it is
nn.BatchNorm1d.
"""

import torch
import torch.distributed.nn.functional as dist_autograd
from torch import nn

from model.collectives import rank_and_world_size


class SyncedBatchNorm1d(nn.BatchNorm1d):
    def forward(self, features):
        """features: (B, C) -> (B, C), normalised by the statistics of the batch on every rank."""
        if not self.training or rank_and_world_size()[1] == 1:
            return super().forward(features)
        values = features.to(torch.promote_types(features.dtype, torch.float32))  # fp32 at least, fp64 kept
        local = torch.cat([values.new_full((1,), values.shape[0]), values.sum(0), (values * values).sum(0)])  # (1+2C)
        totals = dist_autograd.all_reduce(local)
        count, sums, squares = totals[0], totals[1:1 + values.shape[1]], totals[1 + values.shape[1]:]
        mean = sums / count
        variance = (squares / count - mean * mean).clamp(min=0.0)  # biased, as BatchNorm normalises by
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = variance * count / (count - 1).clamp(min=1.0)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        normalised = (values - mean) * torch.rsqrt(variance + self.eps)
        if self.affine:
            normalised = normalised * self.weight + self.bias
        return normalised.to(features.dtype)


def mlp(in_dim, hidden_dims, out_dim, bias=True, last_norm=None):
    """Linear -> SyncedBatchNorm -> ReLU for each hidden width, then Linear to out_dim (SLIP's `_build_mlp` form, the
    SimCLR, BYOL and CLIP 🚀 heads); `last_norm`: an optional module after the output layer."""
    layers, previous = [], in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(previous, hidden, bias=bias), SyncedBatchNorm1d(hidden), nn.ReLU(inplace=True)]
        previous = hidden
    layers.append(nn.Linear(previous, out_dim, bias=bias))
    if last_norm is not None:
        layers.append(last_norm)
    return nn.Sequential(*layers)


