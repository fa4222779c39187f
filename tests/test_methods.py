"""Every method's preset builds the networks and teachers it needs, trains, and refuses nonsense."""

import json
import math

import pytest
import torch
from test_harmony import tiny_batch
from tiny_models import HARMONY, tiny_config, tiny_overrides, tiny_preset_config

from model.meta_arch import MetaArch
from train import presets
from train.config import PRESETS, load_config
from train.ema import update_teachers


def methods_reading(views):
    """The methods (from their presets, train/presets.py) whose demo recipe is `views`."""
    return tuple(method for method, preset in presets.discover("demo").items()
                 if load_config(preset).data.views == views)


METHODS = methods_reading("auto")  # multi-crop or one crop; SLIP, A-CLIP and CLIP 🚀's recipes have their own tests
# the trainer's data at the tiny towers' crop sizes (tiny_models.TINY_TOWERS: 32 px global crops)
TINY_DATA = ["data.global_crop_px=32", "data.local_crop_px=16", "data.batch_size=8", "data.num_workers=0",
             "data.backend=torch", "run.precision=fp32", "run.log_every=1"]


def demo(method):
    return f"{method}/demo"


def tiny_preset_model(preset):
    """The preset's model at tiny shapes (its objectives and their settings kept), drop path off."""
    torch.manual_seed(0)
    return MetaArch(tiny_preset_config(preset, drop_path_rate=0.0))


def train_steps(model, batch, steps, lr=2e-3):
    """Losses of `steps` steps on one batch, as the trainer runs them (teachers, passes, AdamW, clamp, EMA)."""
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=lr)
    teacher_params, student_params = model.ema_pairs()
    values = dict(teacher_cls_temp=0.04, teacher_patch_temp=0.04, clip_hard_weight=1.0)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        teacher = model.forward_teachers(batch)
        total = 0.0
        for group in model.backward_groups:
            for loss, _ in model.group_passes(group, batch, teacher=teacher, **values):
                loss.backward()
                total += float(loss.detach())
        optimizer.step()
        model.after_optimizer_step()
        update_teachers(teacher_params, student_params, 0.9)
        history.append(total)
    return history


@pytest.mark.parametrize("method", METHODS)
def test_every_demo_preset_trains_with_finite_falling_loss(method):
    torch.manual_seed(2)
    history = train_steps(tiny_preset_model(demo(method)), tiny_batch(batch=6), steps=6)
    assert all(math.isfinite(loss) for loss in history), history
    assert sum(history[-2:]) < sum(history[:2]), history


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_demo_and_a_cc3m_preset(method):
    for scale in ("demo", "cc3m"):
        config = load_config(f"{method}/{scale}")
        assert config.run.name == f"{method}_{scale}"
    assert load_config(f"{method}/cc3m").model.vit_size == "base"
    assert (PRESETS / method / "cc3m.yaml").read_text().startswith("#")  # says where its recipe comes from


@pytest.mark.parametrize("method, teachers, objectives", [
    ("clip", set(), ("clip",)),
    ("siglip", set(), ("clip",)),
    ("silc", {"image_student", "ibot_head"}, ("ibot", "clip")),
    ("maskclip", {"image_student"}, ("clip", "masked_text", "masked_distillation")),
    ("mae_clip", set(), ("clip", "multimodal_mae")),
    ("m3ae", set(), ("multimodal_mae",)),
    ("detailclip", {"image_student", "ibot_head"}, ("detailclip",)),
    ("harmony", {"image_student", "ibot_head", "text_student", "text_distillation_head"},
     ("ibot", "clip", "masked_text", "mae")),
])
def test_a_teacher_exists_only_where_an_objective_reads_it(method, teachers, objectives):
    model = tiny_preset_model(demo(method))
    assert set(model.teachers) == teachers and model.backward_groups == objectives


@pytest.mark.parametrize("method, teachers", [("harmony", True), ("clip", False), ("silc", False),
                                              ("detailclip", False), ("aclip", False), ("maskclip", False),
                                              ("byolip", False)])
def test_evaluation_uses_the_teachers_only_where_both_towers_have_one(method, teachers):
    """An EMA image tower was never trained against the student text tower: with no text teacher beside it,
    evaluation reads the students."""
    model = tiny_preset_model(demo(method))
    image, text = model.evaluation_towers()
    source = model.teachers if teachers else {"image_student": model.image_student,
                                              "text_student": model.text_student}
    assert image is source["image_student"] and text is source["text_student"]


def test_networks_are_built_once_and_shared():
    """MaskCLIP's CLIP, MLM and masked distillation train one image and one text student."""
    model = tiny_preset_model("maskclip/demo")
    students = [name for name, _ in model.named_children() if name.endswith("_student")]
    assert students == ["image_student", "text_student"]
    assert not hasattr(model, "text_distillation_head") and hasattr(model, "mlm_decoder")


def test_siglip_has_a_learnable_bias_and_clip_none():
    assert float(tiny_preset_model("siglip/demo").logit_bias) == -10.0
    assert not hasattr(tiny_preset_model("clip/demo"), "logit_bias")


def test_flip_encodes_half_the_patches_in_training_and_all_in_evaluation():
    model, batch = tiny_preset_model("flip/demo"), tiny_batch()
    seen = []
    handle = model.image_student.blocks[0].register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].shape[1]))
    next(model.group_passes("clip", batch, teacher={}, clip_hard_weight=1.0))
    model.image_student.embed_image(batch["global_crops"][0])
    handle.remove()
    assert seen == [1 + 8, 1 + 16]  # CLS + 8 of the 16 patches of a 32 px crop at patch 8; then every patch


def test_logit_scale_is_clamped_after_the_step_when_a_recipe_says_so():
    model = tiny_preset_model("flip/demo")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.after_optimizer_step()
    assert math.isclose(float(model.logit_scale), math.log(100), rel_tol=1e-6)
    unclamped = tiny_preset_model("clip/demo")
    with torch.no_grad():
        unclamped.logit_scale.fill_(7.0)
    unclamped.after_optimizer_step()
    assert float(unclamped.logit_scale) == 7.0


def test_dino_mode_does_not_mask_the_student_views():
    """iBOT without its patch term (SILC's DINO) gives the same loss whatever the iBOT masks are."""
    batch, results = tiny_batch(), []
    for masks in (batch["ibot_masks"], torch.zeros_like(batch["ibot_masks"])):
        model, inputs = tiny_preset_model("silc/demo"), {**batch, "ibot_masks": masks}  # fresh centres
        teacher = model.forward_teachers(inputs)
        results.append(sum(loss for loss, _ in model.group_passes("ibot", inputs, teacher=teacher,
                                                                  teacher_cls_temp=0.04, teacher_patch_temp=0.04)))
    torch.testing.assert_close(results[0], results[1])


def harmony_with(**objectives):
    """Harmony's objectives with some of them changed ({name: settings}, False: left out)."""
    return {name: settings for name, settings in {**HARMONY, **objectives}.items() if settings is not False}


def harmony_clip(**settings):
    return harmony_with(clip={**HARMONY["clip"], **settings})


@pytest.mark.parametrize("objectives, towers, message", [
    (harmony_clip(loss="sigmoid"), {}, "model.objectives.clip: soft targets are softmax"),
    (harmony_clip(soft_targets=False, loss="sigmoid", label_smoothing=0.1), {},
     "model.objectives.clip.label_smoothing smooths softmax targets"),
    (harmony_clip(views=2), {}, "soft targets read the teachers on global crop 1 only"),
    (harmony_with(detailclip={}), {}, "model.objectives.detailclip cannot run with ibot, clip, mae"),
    (HARMONY, dict(clip_pooling="mean"), "clip_pooling='mean' is not one of"),
    (harmony_clip(loss="hinge"), {}, "model.objectives.clip.loss='hinge'"),
    (harmony_clip(mask_ratio=1.0), {}, "model.objectives.clip.mask_ratio=1.0"),
    (harmony_clip(logit_scale_max=0.5), {}, "model.objectives.clip.logit_scale_max=0.5"),
    (harmony_with(multimodal_mae={"text_mask_ratio": 0.0}), {}, "model.objectives.multimodal_mae.text_mask_ratio=0.0"),
    (harmony_with(ibot=False, clip=False, mae=False, masked_text=False), {},
     "names no objective.*masked_distillation, multimodal_mae"),
])
def test_nonsensical_combinations_are_refused_with_what_to_change(objectives, towers, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(objectives, **towers)


def test_teacher_attention_is_the_cls_row_averaged_over_layers_and_heads():
    """forward_with_attention against timm's own unfused attention matrices, caught where they enter attn_drop."""
    model = tiny_preset_model("detailclip/demo").teachers["image_student"]
    images = tiny_batch()["global_crops"][0]
    maps = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda _, inputs, __: maps.append(inputs[0])))
    with torch.no_grad():
        plain = model(images)
        tokens, attention = model.forward_with_attention(images)
    for hook in hooks:
        hook.remove()
    expected = torch.stack(maps[:len(model.blocks)]).mean(0)[:, :, 0, 1:].mean(1)  # attn.mean(0)[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(tokens, plain)


@pytest.mark.parametrize("method", ["maskclip", "m3ae", "detailclip"])
def test_the_trainer_runs_methods_with_one_view_and_two_views_on_real_shards(demo_shards, tmp_path, method):
    """One crop (maskclip, m3ae) and two crops without local crops (detailclip, with the teacher's attention), through
    the loader, the trainer's step, checkpoint and evaluation towers."""
    from train.pretrain import TEACHER_WEIGHTS, train

    run = train(load_config(demo(method), [*tiny_overrides(demo(method)), *TINY_DATA, "data.local_crops_number=0",
                                                "run.max_steps=2", f"data.shards={demo_shards['train']}",
                                                f"run.out_dir={tmp_path}", f"run.name={method}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    assert (run / TEACHER_WEIGHTS).is_file()
