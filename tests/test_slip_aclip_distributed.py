"""SLIP's and A-CLIP's objectives gather with gradient and normalise their heads with SyncBN: two gloo ranks with half
the batch each give the averaged gradients of one rank with all of it (the EMA projector's target included)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_harmony import run_group
from test_harmony_distributed import averaged_gradients, rank_share
from test_slip_aclip import aclip_batch, slip_batch, tiny_method_model

from train.distributed import free_loopback_port

METHODS = {"slip": slip_batch, "aclip": aclip_batch}


def method_gradients(method, rank=0, world_size=1):
    """Averaged gradients after every objective of the method's demo preset on this rank's share of the batch, in
    float64: A-CLIP's BN heads make gradients of about 10, whose float32 rounding alone exceeds the tolerance."""
    model = tiny_method_model(f"{method}_demo").double()  # same initial weights on every rank
    batch = {name: view.double() if view.is_floating_point() else view for name, view in METHODS[method](4).items()}
    local = rank_share(batch, rank, world_size)
    teacher = model.forward_teachers(local)
    for group in model.backward_groups:
        run_group(model, group, local, hard_weight=1.0, teacher=teacher)
    return averaged_gradients(model, world_size)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for method in METHODS:
            torch.save(method_gradients(method, rank, 2), os.path.join(out_dir, f"{method}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_for_slip_and_aclip(tmp_path):
    mp.spawn(rank_main, args=(free_loopback_port(), str(tmp_path)), nprocs=2)
    for method in METHODS:
        single = method_gradients(method)
        assert "simclr_head.0.weight" in single and "image_student.blocks.0.attn.qkv.weight" in single
        assert ("byol_predictor.0.weight" in single) == (method == "aclip")
        for rank in range(2):
            distributed = torch.load(tmp_path / f"{method}{rank}.pt", weights_only=True)
            assert distributed.keys() == single.keys()
            for name, value in single.items():
                torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{method}, rank {rank}: {name}")
