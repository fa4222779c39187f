"""The CLIP 🚀 family gathers (both CLIP terms, SwALIP's prototypes) and all-reduces (SyncBN in every projector,
BarLIP's cross-correlation, SwALIP's Sinkhorn sums): two gloo ranks with half the batch each give the averaged
gradients of one rank with all of it. Text dropout off, so both runs draw nothing at random; 8 samples, so the
projectors' batch statistics are not too ill-conditioned for float32 at these tolerances."""


from test_clip_rocket import rocket_batch, rocket_model
from test_harmony import run_group
from test_harmony_distributed import assert_equal_to_one_rank, averaged_gradients, on_two_ranks

VARIANTS = {"clip_rocket": {}, "siamlip": dict(add_ons={"siamlip": {}}), "byolip": dict(add_ons={"byolip": {}}),
            "barlip": dict(add_ons={"barlip": {}}), "swalip": dict(add_ons={"swalip": {}}, label_smoothing=0.0)}


def rocket_gradients(variant, batch, rank=0, world_size=1):
    model = rocket_model(**VARIANTS[variant])  # same initial weights on every rank
    share = batch["weak"].shape[1] // world_size
    rows = slice(rank * share, (rank + 1) * share)
    run_group(model, "clip_rocket", {name: views[:, rows] for name, views in batch.items()})  # (n, B, ...) views
    return averaged_gradients(model, world_size)


def distributed_rocket_gradients(variant, rank, world_size):
    return rocket_gradients(variant, rocket_batch(batch=8), rank, world_size)


def test_two_ranks_equal_one_rank_for_the_clip_rocket_family(tmp_path):
    results = on_two_ranks(distributed_rocket_gradients, VARIANTS, tmp_path)
    for variant in VARIANTS:
        single = rocket_gradients(variant, rocket_batch(batch=8))
        assert {"logit_scale", "rocket_logit_scale", "rocket_image_projector.0.weight"} <= single.keys()
        assert_equal_to_one_rank(results[variant], single, variant)
