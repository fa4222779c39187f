"""The objectives that gather across ranks (CLIP's variants, SigLIP): two gloo ranks with half the batch each give
the averaged gradients of one rank with all of it."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_harmony import run_group, tiny_batch, tiny_model
from test_harmony_distributed import averaged_gradients, rank_share

from train.distributed import free_loopback_port

CLIP_ONLY = dict(ibot=False, soft_clip=False, mae=False, mlm=False, text_distillation=False, drop_path_rate=0.0)
VARIANTS = {
    "siglip": dict(CLIP_ONLY, clip_loss="sigmoid", logit_scale_init=2.302585),
    "smoothed_two_views_map": dict(CLIP_ONLY, clip_label_smoothing=0.1, clip_views=2, clip_pooling="map"),
}


def clip_gradients(variant, batch, rank=0, world_size=1):
    model = tiny_model(**VARIANTS[variant])
    run_group(model, "clip", rank_share(batch, rank, world_size), hard_weight=1.0, teacher={})
    return averaged_gradients(model, world_size)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for variant in VARIANTS:
            torch.save(clip_gradients(variant, tiny_batch(), rank, 2), os.path.join(out_dir, f"{variant}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_for_every_gathering_objective(tmp_path):
    mp.spawn(rank_main, args=(free_loopback_port(), str(tmp_path)), nprocs=2)
    for variant in VARIANTS:
        single = clip_gradients(variant, tiny_batch())
        assert "logit_scale" in single and ("logit_bias" in single) == (variant == "siglip")
        for rank in range(2):
            distributed = torch.load(tmp_path / f"{variant}{rank}.pt", weights_only=True)
            assert distributed.keys() == single.keys()
            for name, value in single.items():
                torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{variant}, rank {rank}: {name}")
