"""SLIP (docs/methods/slip.md) and A-CLIP (2.7): their losses against written-out formulas, A-CLIP's attention-to-mask
mapping, the frozen patch embedding, the presets training on tiny batches and through the real trainer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_harmony import tiny_batch
from test_methods import train_steps
from tiny_models import tiny_config, tiny_overrides, tiny_preset_config, with_settings

from model.losses import byol_loss, simclr_loss
from model.masking import attention_in_boxes, attentive_keep_indices
from model.meta_arch import MetaArch
from train.config import PRESETS, load_config
from train.ema import update_teachers
from train.parameter_groups import parameter_groups

# the trainer's data and run settings at tiny shapes (the model's come from tiny_overrides)
TINY_TRAINING = ["data.global_crop_px=32", "data.local_crop_px=16", "data.local_crops_number=2", "data.batch_size=8",
                 "data.num_workers=0", "data.backend=torch", "run.precision=fp32", "run.log_every=1"]


def tiny_method_model(preset, **settings):
    """The preset's model at tiny shapes (its objectives and their settings kept); `settings`: {objective: {setting:
    value}} changed on top."""
    config = tiny_preset_config(preset)
    for name, values in settings.items():
        config = with_settings(config, name, **values)
    torch.manual_seed(0)
    return MetaArch(config)


def slip_batch(batch=6, seed=1):
    """slip_views' names: global_crops (1, B, 3, 32, 32), simclr (2, B, 3, 32, 32), tokens (B, 77)."""
    plain = tiny_batch(batch, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    return dict(global_crops=plain["global_crops"][:1], simclr=torch.randn(2, batch, 3, 32, 32, generator=generator),
                tokens=plain["tokens"])


def aclip_batch(batch=6, seed=1):
    """aclip_views' names: online (2, B, 3, 32, 32) and enclosing (1, B, 3, 32, 32) with their (top, left, height,
    width) boxes in source pixels, each online box inside its enclosing box; tokens (B, 77)."""
    generator = torch.Generator().manual_seed(seed)
    enclosing = torch.tensor([[20.0, 10.0, 120.0, 96.0]]).repeat(batch, 1)
    enclosing[:, :2] += torch.randint(0, 30, (batch, 2), generator=generator)  # (B, 4)
    size = torch.empty(2, batch, 2).uniform_(0.4, 0.9, generator=generator) * enclosing[None, :, 2:]  # (2, B, 2)
    corner = enclosing[None, :, :2] + torch.rand(2, batch, 2, generator=generator) * (enclosing[None, :, 2:] - size)
    return dict(online=torch.randn(2, batch, 3, 32, 32, generator=generator),
                enclosing=torch.randn(1, batch, 3, 32, 32, generator=generator),
                online_boxes=torch.cat([corner, size], dim=-1), enclosing_boxes=enclosing[None],
                tokens=tiny_batch(batch, seed)["tokens"])


# Written-out formulas (docs/methods/README.md section 1, 2.3, 2.7), one row at a time.

def written_info_nce(rows, columns, scale):
    """mean over i of -log(exp(s r_i.c_i) / sum_j exp(s r_i.c_j))."""
    terms = []
    for i in range(rows.shape[0]):
        logits = torch.stack([scale * rows[i] @ columns[j] for j in range(columns.shape[0])])
        terms.append(-(logits[i] - torch.log(torch.exp(logits).sum())))
    return torch.stack(terms).mean()


def written_clip(image, text, scale):
    return (written_info_nce(image, text, scale) + written_info_nce(text, image, scale)) / 2


def written_nt_xent(view_a, view_b, temperature, rank=0, local=None):
    """SLIP's NT-Xent over the gathered (N, D) views: for each local row i of view a, the positive a_i.b_i against
    b_j (all j) and a_j (j != i): 2N - 1 candidates; the same with a and b swapped; the mean of both."""
    view_a, view_b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
    total = view_a.shape[0]
    local = range(total) if local is None else local
    terms = []
    for query_view, other_view in ((view_a, view_b), (view_b, view_a)):
        for i in local:
            candidates = [query_view[i] @ other_view[j] for j in range(total)]
            candidates += [query_view[i] @ query_view[j] for j in range(total) if j != i]
            assert len(candidates) == 2 * total - 1
            logits = torch.stack(candidates) / temperature
            terms.append(-(logits[i] - torch.log(torch.exp(logits).sum())))
    return torch.stack(terms).mean()


def written_byol(predictions, targets):
    """mean of 2 - 2 p.t / (|p| |t|)."""
    terms = [2 - 2 * (p @ t) / (p.norm() * t.norm()) for p, t in zip(predictions, targets, strict=True)]
    return torch.stack(terms).mean()


def test_simclr_loss_is_nt_xent_with_2n_minus_1_candidates_per_row():
    world, batch, rank = 2, 3, 1
    view_a, view_b = torch.randn(world * batch, 5, dtype=torch.float64), torch.randn(world * batch, 5,
                                                                                      dtype=torch.float64)
    rows = slice(rank * batch, (rank + 1) * batch)
    unit_a, unit_b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
    loss, _ = simclr_loss(unit_a[rows], unit_b[rows], unit_a, unit_b, 0.1, rank)
    torch.testing.assert_close(loss, written_nt_xent(view_a, view_b, 0.1, local=range(3, 6)))


def test_byol_loss_is_two_minus_two_cosine():
    predictions, targets = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(byol_loss(predictions, targets)[0], written_byol(predictions, targets))


def test_slip_simclr_objective_is_nt_xent_of_each_views_cls_through_the_head():
    model, batch = tiny_method_model("slip/demo"), slip_batch()
    (loss, stats), = model.group_passes("simclr", batch, teacher={})
    with torch.no_grad():
        heads = [model.simclr_head(model.image_student(crop)[:, 0]) for crop in batch["simclr"]]  # per view, as SLIP
    torch.testing.assert_close(loss, written_nt_xent(heads[0], heads[1], 0.1))
    assert loss.requires_grad and model.config.objectives["simclr"].weight == 1.0


def test_aclip_objective_is_half_clip_per_view_plus_simclr_plus_two_byol():
    model, batch = tiny_method_model("aclip/demo"), aclip_batch()
    teacher = model.forward_teachers(batch)
    keep, target = teacher["aclip_keep"].clone(), teacher["aclip_target"].clone()
    (loss, stats), = model.group_passes("aclip", batch, teacher=dict(teacher))
    with torch.no_grad():
        teacher_cls = model.teachers["image_student"](batch["enclosing"][0])[:, 0]
        torch.testing.assert_close(target, model.teachers["byol_projector"](teacher_cls))
        tokens = torch.cat([model.image_student(crop, keep_indices=view_keep)
                            for crop, view_keep in zip(batch["online"], keep, strict=True)])  # (2B, 1 + n_keep, D)
        cls = tokens[:, 0]
        images = F.normalize(model.image_student.embed_tokens(tokens), dim=-1).chunk(2)
        text = F.normalize(model.text_student(batch["tokens"])[0], dim=-1)
        scale = model.logit_scale.exp()
        clip = 0.5 * written_clip(images[0], text, scale) + 0.5 * written_clip(images[1], text, scale)
        ssl = model.simclr_head(cls).chunk(2)  # both views in one batch, as A-CLIP
        simclr = written_nt_xent(ssl[0], ssl[1], 0.1)  # view 1 against view 2 (the official [:bs] bug fixed)
        byol = written_byol(model.byol_predictor(model.byol_projector(cls)), torch.cat([target, target]))
    torch.testing.assert_close(stats["aclip_clip"], clip)
    torch.testing.assert_close(stats["aclip_simclr"], simclr)
    torch.testing.assert_close(stats["aclip_byol"], byol)
    torch.testing.assert_close(loss, clip + simclr + 2 * byol)


def test_an_attention_peak_in_a_corner_keeps_the_online_blocks_covering_that_corner():
    """The enclosing crop (top 30, left 50, 200 x 160 px) on a 14x14 grid, its attention peaked on its top-left 2x2
    patches; an online box that is the enclosing crop's top-left quarter sees the peak over its top-left 4x4 patches
    (2x2 blocks of its 7x7), which it keeps; a box in the bottom-right quarter sees none of it."""
    grid = (14, 14)
    attention = torch.rand(1, 14, 14) * 1e-3
    attention[0, :2, :2] = 1.0
    enclosing = torch.tensor([[30.0, 50.0, 200.0, 160.0]])
    boxes = torch.tensor([[[30.0, 50.0, 100.0, 80.0]], [[130.0, 130.0, 100.0, 80.0]]])  # (2, 1, 4)
    mapped = attention_in_boxes(attention.flatten(1), grid, enclosing, boxes)  # (2, 1, 196)
    keep, _ = attentive_keep_indices(mapped.flatten(0, 1), grid)
    corner = {row * 14 + col for row in range(4) for col in range(4)}
    assert corner <= set(keep[0].tolist())
    assert mapped[0, 0].reshape(14, 14)[:4, :4].min() > 0.5 > mapped[1, 0].max()


def test_an_online_box_equal_to_the_enclosing_box_keeps_the_top_blocks_of_the_map_itself():
    grid, attention = (14, 14), torch.rand(3, 196)
    enclosing = torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 20.0, 150.0, 90.0], [5.0, 5.0, 60.0, 300.0]])
    mapped = attention_in_boxes(attention, grid, enclosing, enclosing[None])
    torch.testing.assert_close(mapped[0], attention)
    keep, removed = attentive_keep_indices(mapped[0], grid)
    blocks = attention.reshape(3, 7, 2, 7, 2).mean(dim=(2, 4)).flatten(1)  # (3, 49): 2x2 block means
    top_blocks = blocks.topk(int(49 * 0.5) + 1, dim=1).indices  # 25 blocks
    expected = [sorted(14 * (2 * (b // 7) + dr) + 2 * (b % 7) + dc for b in row.tolist() for dr in (0, 1)
                       for dc in (0, 1)) for row in top_blocks]
    assert keep.tolist() == expected
    assert keep.shape == (3, 100) and int(removed.sum()) == 3 * 96  # 100 of 196 patches kept


def test_the_student_encodes_int_blocks_half_plus_one_blocks_of_four_patches():
    """Tiny grid 4x4 = 4 blocks: int(4 * 0.5) + 1 = 3 blocks, 12 patches (+ CLS) per online view."""
    model, batch = tiny_method_model("aclip/demo"), aclip_batch()
    seen = []
    handle = model.image_student.blocks[0].register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].shape))
    teacher = model.forward_teachers(batch)
    assert teacher["aclip_keep"].shape == (2, 6, 12)
    next(model.group_passes("aclip", batch, teacher=teacher))
    handle.remove()
    assert seen == [(2 * 6, 1 + 12, 96)]


def test_the_frozen_patch_embedding_gets_no_update_while_other_weights_do():
    """One trainer-style step (the trainer's AdamW groups with weight decay, EMA): the patch embedding keeps its
    weights, in the student and in its EMA copy; the blocks move; the checkpoint still holds the patch embedding."""
    model, batch = tiny_method_model("aclip/demo"), aclip_batch()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-2, weight_decay=0.5)
    teacher = model.forward_teachers(batch)
    for loss, _ in model.group_passes("aclip", batch, teacher=teacher):
        loss.backward()
    optimizer.step()
    update_teachers(*model.ema_pairs(), 0.9)
    parameters = dict(model.named_parameters())
    frozen = [name for name in parameters if ".patch_embed." in name]
    assert frozen == ["image_student.patch_embed.proj.weight", "image_student.patch_embed.proj.bias",
                      "teachers.image_student.patch_embed.proj.weight", "teachers.image_student.patch_embed.proj.bias"]
    for name in frozen:
        assert torch.equal(parameters[name], before[name]) and parameters[name].grad is None, name
    for name in ("image_student.blocks.0.attn.qkv.weight", "teachers.image_student.blocks.0.attn.qkv.weight",
                 "byol_predictor.0.weight", "simclr_head.0.weight"):
        assert not torch.equal(parameters[name], before[name]), name
    assert "image_student.patch_embed.proj.weight" in model.state_dict()


def test_the_patch_embedding_trains_when_the_field_says_so():
    model = tiny_method_model("aclip/demo", aclip={"freeze_patch_embed": False})
    assert model.image_student.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize("method, teachers, objectives", [
    ("slip", set(), ("clip", "simclr")),
    ("aclip", {"image_student", "byol_projector"}, ("aclip",)),  # no EMA text tower (the official one is unused)
])
def test_each_method_builds_the_teachers_it_reads_and_nothing_else(method, teachers, objectives):
    model = tiny_method_model(f"{method}/demo")
    assert set(model.teachers) == teachers and model.backward_groups == objectives


@pytest.mark.parametrize("method", ["slip", "aclip"])
def test_the_demo_and_cc3m_presets_exist_and_say_where_their_recipe_comes_from(method):
    contrastive = {"slip": "clip", "aclip": "aclip"}[method]  # the objective holding its CLIP term's logit scale
    for scale in ("demo", "cc3m"):
        config = load_config(f"{method}/{scale}")
        assert config.run.name == f"{method}_{scale}" and config.data.views == method
        assert config.model.objectives[contrastive].logit_scale_max == 100
    assert load_config(f"{method}/cc3m").model.vit_size == "base"
    assert (PRESETS / method / "cc3m.yaml").read_text().startswith("#")


def test_the_cc3m_presets_carry_the_papers_numbers():
    slip, aclip = load_config("slip/cc3m"), load_config("aclip/cc3m")
    global_batch = 8 * slip.data.batch_size
    assert math.isclose(slip.optim.lr * global_batch / 256, 3e-3) and slip.optim.weight_decay == 0.1
    simclr = slip.model.objectives["simclr"]
    assert (simclr.temperature, simclr.weight, simclr.hidden_dim, simclr.out_dim) == (0.1, 1.0, 4096, 256)
    assert math.isclose(aclip.optim.lr * 8 * aclip.data.batch_size / 256, 5e-4) and aclip.optim.weight_decay == 0.5
    aclip_settings = aclip.model.objectives["aclip"]
    assert (aclip.optim.epochs, aclip.optim.teacher_momentum, aclip_settings.byol_weight, aclip_settings.mask_ratio,
            aclip_settings.freeze_patch_embed) == (25, 0.996, 2.0, 0.5, True)


@pytest.mark.parametrize("objectives, towers, message", [
    ({"aclip": {}, "clip": {}}, {}, "model.objectives.aclip cannot run with clip"),
    ({"aclip": {}, "simclr": {}}, {}, "model.objectives.aclip cannot run with simclr"),
    ({"aclip": {}}, dict(global_crop_px=24), "aclip removes patches in 2x2 blocks"),
    ({"clip": {}, "simclr": {"temperature": 0.0}}, {}, "model.objectives.simclr.temperature=0.0"),
    ({"aclip": {"mask_ratio": 1.0}}, {}, "model.objectives.aclip.mask_ratio=1.0"),
    ({"clip": {}, "simclr": {"out_dim": 0}}, {}, "model.objectives.simclr.out_dim=0"),
])
def test_nonsensical_combinations_are_refused_with_what_to_change(objectives, towers, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(objectives, **towers)


def test_a_recipe_without_the_views_a_method_reads_is_refused_before_training():
    with pytest.raises(ValueError, match=r"also read \['online', 'enclosing', 'online_boxes', 'enclosing_boxes'\]"):
        load_config("aclip/demo", ["data.views=slip"])
    with pytest.raises(ValueError, match=r"also read \['simclr'\]"):
        load_config("slip/demo", ["data.views=auto"])


@pytest.mark.parametrize("method, make_batch", [("slip", slip_batch), ("aclip", aclip_batch)])
def test_each_demo_preset_trains_with_finite_falling_loss(method, make_batch):
    torch.manual_seed(2)
    history = train_steps(tiny_method_model(f"{method}/demo"), make_batch(batch=6), steps=6)
    assert all(math.isfinite(loss) for loss in history), history
    assert sum(history[-2:]) < sum(history[:2]), history


@pytest.mark.parametrize("method", ["slip", "aclip"])
def test_the_trainer_runs_each_method_on_real_shards(demo_shards, tmp_path, method):
    """The recipe's views (SLIP's CLIP and SimCLR crops; A-CLIP's online and zoom-out crops with their boxes) through
    the loader, the trainer's step, checkpoint and evaluation towers."""
    from train.pretrain import TEACHER_WEIGHTS, train

    preset = f"{method}/demo"
    run = train(load_config(preset, [*tiny_overrides(preset), *TINY_TRAINING, f"data.views={method}",
                                     "run.max_steps=2", f"data.shards={demo_shards['train']}",
                                     f"run.out_dir={tmp_path}", f"run.name={method}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    assert (run / TEACHER_WEIGHTS).is_file()
