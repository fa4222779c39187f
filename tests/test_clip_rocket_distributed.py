"""The CLIP 🚀 family gathers (both CLIP terms, SwALIP's prototypes) and all-reduces (SyncBN in every projector,
BarLIP's cross-correlation, SwALIP's Sinkhorn sums): two gloo ranks with half the batch each give the averaged
gradients of one rank with all of it. Text dropout off, so both runs draw nothing at random; 8 samples, so the
projectors' batch statistics are not too ill-conditioned for float32 at these tolerances."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_clip_rocket import rocket_batch, rocket_model
from test_harmony import run_group
from test_harmony_distributed import averaged_gradients

from train.distributed import free_loopback_port

VARIANTS = {"clip_rocket": {}, "siamlip": dict(siamlip=True), "byolip": dict(byolip=True), "barlip": dict(barlip=True),
            "swalip": dict(swalip=True, rocket_label_smoothing=0.0)}


def rocket_gradients(variant, batch, rank=0, world_size=1):
    model = rocket_model(**VARIANTS[variant])  # same initial weights on every rank
    share = batch["weak"].shape[1] // world_size
    rows = slice(rank * share, (rank + 1) * share)
    run_group(model, "clip_rocket", {name: views[:, rows] for name, views in batch.items()})  # (n, B, ...) views
    return averaged_gradients(model, world_size)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for variant in VARIANTS:
            gradients = rocket_gradients(variant, rocket_batch(batch=8), rank, 2)
            torch.save(gradients, os.path.join(out_dir, f"{variant}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_for_the_clip_rocket_family(tmp_path):
    mp.spawn(rank_main, args=(free_loopback_port(), str(tmp_path)), nprocs=2)
    for variant in VARIANTS:
        single = rocket_gradients(variant, rocket_batch(batch=8))
        assert {"logit_scale", "rocket_logit_scale", "rocket_image_projector.0.weight"} <= single.keys()
        for rank in range(2):
            distributed = torch.load(tmp_path / f"{variant}{rank}.pt", weights_only=True)
            assert distributed.keys() == single.keys()
            for name, value in single.items():
                torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{variant}, rank {rank}: {name}")
