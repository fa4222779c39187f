"""SyncedBatchNorm1d: nn.BatchNorm1d on one rank; on two gloo ranks with half the batch each, the outputs, input
gradients, parameter gradients and running statistics of one rank with all of it."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from model.batch_norm import SyncedBatchNorm1d
from train.distributed import free_loopback_port

BATCH, CHANNELS = 8, 5


def inputs():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, CHANNELS, generator=generator) * 3 + 1
    upstream = torch.randn(BATCH, CHANNELS, generator=generator)
    return features, upstream


def run(norm, rank=0, world_size=1):
    """Forward and backward of rows rank::world_size; the gradients summed over ranks are the loss's."""
    torch.manual_seed(1)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    features, upstream = inputs()
    share = features[rank::world_size].clone().requires_grad_(True)
    output = norm(share)
    (output * upstream[rank::world_size]).sum().backward()
    return output.detach(), share.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var


def test_one_rank_is_batch_norm():
    for mine, reference in zip(run(SyncedBatchNorm1d(CHANNELS)), run(nn.BatchNorm1d(CHANNELS)), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(run(SyncedBatchNorm1d(CHANNELS), rank, 2), os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path):
    mp.spawn(rank_main, args=(free_loopback_port(), str(tmp_path)), nprocs=2)
    output, input_grad, weight_grad, bias_grad, running_mean, running_var = run(nn.BatchNorm1d(CHANNELS))
    parts = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for rank, part in enumerate(parts):
        torch.testing.assert_close(part[0], output[rank::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part[1], input_grad[rank::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part[4], running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part[5], running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[0][2] + parts[1][2], weight_grad, rtol=1e-5, atol=1e-5)  # per-rank shares
    torch.testing.assert_close(parts[0][3] + parts[1][3], bias_grad, rtol=1e-5, atol=1e-5)
