"""SLIP's and A-CLIP's objectives gather with gradient and normalise their heads with SyncBN: two gloo ranks with half
the batch each give the averaged gradients of one rank with all of it (the EMA projector's target included)."""


from test_harmony import run_group
from test_harmony_distributed import assert_equal_to_one_rank, averaged_gradients, on_two_ranks, rank_share
from test_slip_aclip import aclip_batch, slip_batch, tiny_method_model

METHODS = {"slip": slip_batch, "aclip": aclip_batch}


def method_gradients(method, rank=0, world_size=1):
    """Averaged gradients after every objective of the method's demo preset on this rank's share of the batch, in
    float64: A-CLIP's BN heads make gradients of about 10, whose float32 rounding alone exceeds the tolerance."""
    model = tiny_method_model(f"{method}/demo").double()  # same initial weights on every rank
    batch = {name: view.double() if view.is_floating_point() else view for name, view in METHODS[method](4).items()}
    local = rank_share(batch, rank, world_size)
    teacher = model.forward_teachers(local)
    for group in model.backward_groups:
        run_group(model, group, local, hard_weight=1.0, teacher=teacher)
    return averaged_gradients(model, world_size)


def test_two_ranks_equal_one_rank_for_slip_and_aclip(tmp_path):
    results = on_two_ranks(method_gradients, METHODS, tmp_path)
    for method in METHODS:
        single = method_gradients(method)
        assert "simclr_head.0.weight" in single and "image_student.blocks.0.attn.qkv.weight" in single
        assert ("byol_predictor.0.weight" in single) == (method == "aclip")
        assert_equal_to_one_rank(results[method], single, method)
