"""The objectives that gather across ranks (CLIP's variants, SigLIP): two gloo ranks with half the batch each give
the averaged gradients of one rank with all of it."""


from test_harmony import run_group, tiny_batch, tiny_model
from test_harmony_distributed import assert_equal_to_one_rank, averaged_gradients, on_two_ranks, rank_share

VARIANTS = {  # CLIP alone: (its settings, the towers')
    "siglip": (dict(loss="sigmoid", logit_scale_init=2.302585), {}),
    "smoothed_two_views_map": (dict(label_smoothing=0.1, views=2), dict(clip_pooling="map")),
}


def clip_gradients(variant, batch, rank=0, world_size=1):
    clip, towers = VARIANTS[variant]
    model = tiny_model({"clip": clip}, drop_path_rate=0.0, **towers)
    run_group(model, "clip", rank_share(batch, rank, world_size), hard_weight=1.0, teacher={})
    return averaged_gradients(model, world_size)


def distributed_clip_gradients(variant, rank, world_size):
    return clip_gradients(variant, tiny_batch(), rank, world_size)


def test_two_ranks_equal_one_rank_for_every_gathering_objective(tmp_path):
    results = on_two_ranks(distributed_clip_gradients, VARIANTS, tmp_path)
    for variant in VARIANTS:
        single = clip_gradients(variant, tiny_batch())
        assert "logit_scale" in single and ("logit_bias" in single) == (variant == "siglip")
        assert_equal_to_one_rank(results[variant], single, variant)
