"""Harmony on the meta-architecture: which parameters each backward group trains, teachers, centres, EMA pairing."""

import pytest
import torch
from tiny_models import HARMONY, tiny_config
from tiny_models import tiny_model as tiny_model_of

import model.objectives.masked_text as text_objective
from model import losses
from model.masking import mask_captions, random_keep_indices
from model.text_tower import trim_padding

# Harmony at tiny shapes (tiny_models.TINY_SETTINGS: iBOT out_dim 64, text distillation out_dim 32, MLM mask
# probability 0.5), with drop path on in the student
TINY_DROP_PATH = 0.1
TEMPS = dict(teacher_cls_temp=0.04, teacher_patch_temp=0.07)
CLIP_ONLY = {"clip": {}}


def tiny_model(objectives=None, **towers):
    """Harmony's objectives by default (`objectives`: {name: settings overrides}), seeded."""
    return tiny_model_of(objectives, **{"drop_path_rate": TINY_DROP_PATH, **towers})


def tiny_batch(batch=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    for row in range(batch):
        length = 5 + row
        tokens[row, 0] = 49406
        tokens[row, 1:length + 1] = torch.randint(300, 3000, (length,), generator=generator)
        tokens[row, length + 1] = 49407
    return dict(
        global_crops=torch.randn(2, batch, 3, 32, 32, generator=generator),
        local_crops=torch.randn(3, batch, 3, 16, 16, generator=generator),
        ibot_masks=torch.rand(2, batch, 4, 4, generator=generator) < 0.4,
        tokens=tokens,
    )


def run_group(model, group, batch, hard_weight=0.5, backward=True, teacher=None):
    """(loss, metrics) of one backward group, computed as the trainer does: each pass's loss backwarded in turn
    (backward=False: none), the losses and metrics summed over the passes."""
    if teacher is None:
        teacher = model.forward_teachers(batch)
    total, metrics = 0, {}
    for loss, stats in model.group_passes(group, batch, teacher=teacher, **TEMPS, clip_hard_weight=hard_weight):
        if backward:
            loss.backward()
        total = total + loss
        for name, value in stats.items():
            metrics[name] = metrics.get(name, 0) + value
    return total, metrics


def names_with_gradient(model):
    return {name for name, param in model.named_parameters() if param.grad is not None}


def trainable_names(model, prefix, exclude=()):
    return {name for name, param in model.named_parameters()
            if name.startswith(prefix) and param.requires_grad and not any(part in name for part in exclude)}


def expected_gradients(model, group):
    text_pooling = ("ln_final", "text_projection")  # only the pooled CLIP embedding reads them
    if group == "ibot":
        return trainable_names(model, "image_student.", exclude=("contrastive_projection",)) | \
            trainable_names(model, "ibot_head.")
    if group == "clip":
        return trainable_names(model, "image_student.", exclude=("mask_token",)) | \
            trainable_names(model, "text_student.") | {"logit_scale"}
    if group == "masked_text":
        return trainable_names(model, "text_student.", exclude=text_pooling) | \
            trainable_names(model, "mlm_decoder.") | trainable_names(model, "text_distillation_head.")
    return trainable_names(model, "image_student.", exclude=("mask_token", "contrastive_projection")) | \
        trainable_names(model, "mae_decoder.")


@pytest.mark.parametrize("group", ["ibot", "clip", "masked_text", "mae"])
def test_each_group_trains_exactly_the_student_parameters_it_uses(group):
    model, batch = tiny_model(), tiny_batch()
    loss, metrics = run_group(model, group, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(value).all() for value in metrics.values())
    assert names_with_gradient(model) == expected_gradients(model, group)
    assert all(param.grad is None for param in model.teachers.parameters())


def test_teachers_start_as_copies_and_are_frozen():
    model = tiny_model()
    assert set(model.teachers) == {"image_student", "ibot_head", "text_student", "text_distillation_head"}
    assert not any(param.requires_grad for param in model.teachers.parameters())
    teacher_params, student_params = model.ema_pairs()
    assert all(t.shape == s.shape and torch.equal(t, s) for t, s in zip(teacher_params, student_params, strict=True))
    teacher_count = sum(1 for _ in model.teachers.parameters())
    assert len(teacher_params) == teacher_count - 1  # all but the image teacher's unused mask token
    student_ids = {id(param) for param in student_params}
    assert id(model.image_student.contrastive_projection) in student_ids
    assert id(model.text_student.transformer.text_projection) in student_ids
    assert id(model.image_student.mask_token) not in student_ids


def test_teacher_has_no_drop_path():
    model = tiny_model(drop_path_rate=0.5)
    assert model.teachers["image_student"].blocks[-1].drop_path1.__class__.__name__ == "Identity"
    assert model.image_student.blocks[-1].drop_path1.drop_prob == 0.5


def test_per_group_backward_equals_one_combined_backward():
    """The memory-saving per-group backward computes the same gradients as one backward of the sum."""
    batch = tiny_batch()

    def gradients(per_group):
        model = tiny_model(drop_path_rate=0.0)
        torch.manual_seed(5)  # the MLM and MAE masks are drawn in the same order in both runs
        total = 0
        for group in model.backward_groups:
            loss, _ = run_group(model, group, batch, backward=per_group)
            if not per_group:
                total = total + loss
        if not per_group:
            total.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    separate, combined = gradients(True), gradients(False)
    assert separate.keys() == combined.keys() and len(separate) > 50
    for name in separate:
        torch.testing.assert_close(separate[name], combined[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ibot_updates_centres_with_teacher_logit_means():
    model, batch = tiny_model(), tiny_batch()
    with torch.no_grad():
        tokens = model.teachers["image_student"](batch["global_crops"].flatten(0, 1)).unflatten(0, (2, 4))
        logits = model.teachers["ibot_head"](tokens)  # (2, B, 1 + N, K)
    run_group(model, "ibot", batch)
    torch.testing.assert_close(model.ibot_cls_center, 0.1 * logits[:, :, 0].mean(dim=(0, 1))[None])
    torch.testing.assert_close(model.ibot_patch_center, 0.1 * logits[:, :, 1:].mean(dim=(0, 1, 2))[None, None])


def test_text_step_updates_centre_over_real_tokens_only():
    model, batch = tiny_model({**HARMONY, "masked_text": {"mlm": False}}), tiny_batch()
    with torch.no_grad():
        features = model.teachers["text_student"](batch["tokens"])[1]
        logits = model.teachers["text_distillation_head"](features)  # (B, 77, K)
    run_group(model, "masked_text", batch)
    real = torch.zeros(4, 77, dtype=torch.bool)
    for row in range(4):
        real[row, :7 + row] = True  # SOT, 5 + row words, EOT
    torch.testing.assert_close(model.text_center, 0.1 * logits[real].mean(0)[None, None])


def test_clip_only_baseline_has_no_teachers_and_hard_loss_only():
    model = tiny_model(CLIP_ONLY)
    assert model.backward_groups == ("clip",) and len(model.teachers) == 0
    assert not hasattr(model, "mae_decoder") and not hasattr(model, "ibot_head")
    loss, metrics = run_group(model, "clip", tiny_batch(), hard_weight=0.2)  # no teacher: the weight is moot
    torch.testing.assert_close(loss, metrics["clip_hard"])
    assert [id(p) for p in model.clipped_parameters()] == [id(p) for p in model.image_student.parameters()]


def test_soft_targets_enter_only_below_hard_weight_one():
    model, batch = tiny_model(), tiny_batch()
    hard_only, hard_metrics = run_group(model, "clip", batch, hard_weight=1.0)
    mixed, metrics = run_group(model, "clip", batch, hard_weight=0.5)
    assert "clip_soft" not in hard_metrics
    torch.testing.assert_close(mixed, 0.5 * metrics["clip_hard"] + 0.5 * metrics["clip_soft"])
    torch.testing.assert_close(hard_only, hard_metrics["clip_hard"])


def test_enabled_groups_follow_the_config_in_official_order():
    assert tiny_model().backward_groups == ("ibot", "clip", "masked_text", "mae")
    # the names' order in the config does not matter: the passes run in the official order
    assert tiny_model({"clip": {"soft_targets": True}, "ibot": {}}).backward_groups == ("ibot", "clip")
    text_only = tiny_model({"masked_text": {}})
    assert text_only.backward_groups == ("masked_text",) and set(text_only.teachers) == {"text_student",
                                                                                  "text_distillation_head"}


@pytest.mark.parametrize("objectives, towers, message", [
    ({"swalip": {}}, {}, "model.objectives.swalip needs clip_rocket: add model.objectives.clip_rocket"),
    ({}, {}, "at least one"),
    (HARMONY, dict(vit_size="huge"), "vit_size"),
    (HARMONY, dict(global_crop_px=30), "multiple of patch_size"),
])
def test_config_errors_say_what_to_change(objectives, towers, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(objectives, **{"drop_path_rate": TINY_DROP_PATH, **towers})


def test_all_groups_under_bf16_autocast():
    model, batch = tiny_model(), tiny_batch()
    for group in model.backward_groups:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = run_group(model, group, batch)
        assert torch.isfinite(loss), group
    assert all(torch.isfinite(param.grad).all() for param in model.parameters() if param.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_all_groups_on_gpu_under_bf16_autocast():
    model = tiny_model().cuda()
    batch = {name: tensor.cuda() for name, tensor in tiny_batch().items()}
    for group in model.backward_groups:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = run_group(model, group, batch)
        assert torch.isfinite(loss), group


def test_trimmed_captions_give_the_same_text_and_clip_losses_and_gradients(monkeypatch):
    """Cutting the padding after the longest caption (as the trainer does) changes nothing: attention is
    causal and every loss reads positions up to EOT. The MLM draws are made on the full 77 columns for both."""
    def masking_on_77_columns(tokens, probability):
        full = torch.zeros(tokens.shape[0], 77, dtype=tokens.dtype)
        full[:, :tokens.shape[1]] = tokens
        masked_tokens, labels, masked = mask_captions(full, probability, torch.Generator().manual_seed(3))
        length = tokens.shape[1]
        return masked_tokens[:, :length], labels[:, :length], masked[:, :length]

    monkeypatch.setattr(text_objective, "mask_captions", masking_on_77_columns)
    batch = tiny_batch()
    trimmed = {**batch, "tokens": trim_padding(batch["tokens"])}
    assert trimmed["tokens"].shape == (4, 16)  # longest caption: SOT + 8 words + EOT = 10 ids
    results = []
    for inputs in (batch, trimmed):
        model = tiny_model(drop_path_rate=0.0)
        losses = [run_group(model, group, inputs)[0] for group in ("clip", "masked_text")]
        results.append((losses, {name: param.grad for name, param in model.named_parameters()
                                 if param.grad is not None}))
    (full_losses, full_grads), (trimmed_losses, trimmed_grads) = results
    torch.testing.assert_close(trimmed_losses, full_losses)
    assert full_grads.keys() == trimmed_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_trim_padding_keeps_every_caption_id():
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([49406, 0, 0, 49407])  # id 0 ("!") inside a caption is not padding
    tokens[1, :2] = torch.tensor([49406, 49407])
    tokens[2, :20] = 500
    assert trim_padding(tokens).shape == (3, 32)
    assert trim_padding(tokens[:2]).shape == (2, 16)
    long = torch.full((1, 77), 7)
    assert trim_padding(long).shape == (1, 77)
    assert trim_padding(tokens, multiple=1).shape == (3, 20)


def previous_ibot_group(model, batch):
    """iBOT as one backward before it was split into passes: the teacher head on every token, both global views
    and all local views through the student at once, the loss over all views in one share. (loss, centres)."""
    views, size = batch["global_crops"].shape[:2]
    masks = batch["ibot_masks"].flatten(2)
    with torch.no_grad():
        tokens = model.teachers["image_student"](batch["global_crops"].flatten(0, 1)).unflatten(0, (views, size))
        teacher_logits = model.teachers["ibot_head"](tokens)  # (2, B, 1 + N, K)
    global_tokens = model.image_student(batch["global_crops"].flatten(0, 1),
                                        patch_mask=batch["ibot_masks"].flatten(0, 1))
    local_tokens = model.image_student(batch["local_crops"].flatten(0, 1))
    student_cls = model.ibot_head(torch.cat([global_tokens[:, 0], local_tokens[:, 0]])).unflatten(0, (-1, size))
    student_patches = model.ibot_head(global_tokens[:, 1:][masks.flatten(0, 1)])
    cls_probs = losses.teacher_probs(teacher_logits[:, :, 0], model.ibot_cls_center, TEMPS["teacher_cls_temp"])
    patch_probs = losses.teacher_probs(teacher_logits[:, :, 1:][masks], model.ibot_patch_center[0],
                                       TEMPS["teacher_patch_temp"])
    all_views = student_cls.shape[0]
    loss, _ = losses.ibot_loss_share(student_cls, range(all_views), student_patches, cls_probs, patch_probs, masks,
                                     views * (all_views - 1))
    centres = (0.1 * teacher_logits[:, :, 0].mean(dim=(0, 1))[None],
               0.1 * teacher_logits[:, :, 1:].flatten(0, 1).mean(1).mean(0)[None, None])
    return loss, centres


def previous_mae_group(model, batch):
    """MAE as one backward before it was split per crop: both crops in one encoder pass, G x the joint mean."""
    crops = batch["global_crops"].flatten(0, 1)  # (G*B, 3, H, W)
    num_patches = (crops.shape[-1] // model.config.patch_size) ** 2
    keep, removed = random_keep_indices(crops.shape[0], num_patches, model.config.objectives["mae"].mask_ratio)
    predictions = model.mae_decoder(model.image_student(crops, keep_indices=keep), keep, num_patches)
    return 2 * losses.mae_loss(predictions, crops, removed, model.config.patch_size)[0]


def gradients_of(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("group", ["ibot", "mae"])
def test_passes_equal_the_previous_one_backward_group(group):
    """iBOT per view group and MAE per crop give the loss, gradients and centres of the group in one backward
    (drop path off: its draws are per forward). The local views are split into two passes here."""
    batch = {**tiny_batch(), "local_crops": torch.randn(4, 4, 3, 16, 16, generator=torch.Generator().manual_seed(4))}
    model = tiny_model(drop_path_rate=0.0)
    torch.manual_seed(7)
    if group == "ibot":
        loss, centres = previous_ibot_group(model, batch)
    else:
        loss, centres = previous_mae_group(model, batch), ()
    loss.backward()
    previous = gradients_of(model)
    model = tiny_model(drop_path_rate=0.0)
    torch.manual_seed(7)  # the MAE masks: one draw of (2B, N) equals two of (B, N)
    passes = list(model.group_passes(group, batch, teacher=model.forward_teachers(batch),
                                     **TEMPS, clip_hard_weight=0.5))
    assert len(passes) == (4 if group == "ibot" else 2)
    sum(loss for loss, _ in passes).backward()
    torch.testing.assert_close(sum(loss for loss, _ in passes), loss)
    now = gradients_of(model)
    assert now.keys() == previous.keys() and len(now) > 20
    for name, grad in now.items():
        torch.testing.assert_close(grad, previous[name], rtol=1e-4, atol=1e-6, msg=name)
    if centres:
        torch.testing.assert_close(model.ibot_cls_center, centres[0])
        torch.testing.assert_close(model.ibot_patch_center, centres[1])


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    """Every group with per-block checkpointing in the students (drop path on: the recompute replays its draws)."""
    batch = tiny_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_model(drop_path_rate=0.3, activation_checkpointing=checkpointing)
        torch.manual_seed(11)
        step_losses = [run_group(model, group, batch)[0].detach() for group in model.backward_groups]
        results.append((step_losses, gradients_of(model), torch.rand(3)))
    (plain_losses, plain_grads, plain_next), (losses_now, grads_now, next_now) = results
    torch.testing.assert_close(losses_now, plain_losses)
    assert grads_now.keys() == plain_grads.keys()
    for name, grad in grads_now.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(next_now, plain_next)  # the random stream goes on as without checkpointing
    model = tiny_model(activation_checkpointing=True)
    assert model.image_student.grad_checkpointing and model.mae_decoder.grad_checkpointing
    assert model.text_student.transformer.transformer.grad_checkpointing
    assert model.mlm_decoder.transformer.grad_checkpointing
    assert not model.teachers["image_student"].grad_checkpointing
    assert not model.teachers["text_student"].transformer.transformer.grad_checkpointing


def test_each_teacher_output_is_let_go_by_its_one_reader():
    """forward_teachers computes only what the enabled groups read; each group pops what it read, so nothing a
    teacher made outlives its reader (the iBOT head's logits only at CLS and masked patches)."""
    model, batch = tiny_model(), tiny_batch()
    teacher = model.forward_teachers(batch)
    masked = int(batch["ibot_masks"].sum())
    assert teacher["ibot_cls"].shape == (2, 4, 64) and teacher["ibot_masked_patches"].shape == (masked, 64)
    held = {"ibot": {"ibot_cls", "ibot_masked_patches", "ibot_patch_mean"}, "clip": {"clip_image", "clip_text"},
            "masked_text": {"text_features"}, "mae": set()}
    for group in model.backward_groups:
        before = set(teacher)
        run_group(model, group, batch, teacher=teacher)
        assert before - set(teacher) == held[group], group
    assert teacher == {}
    clip_only = tiny_model(CLIP_ONLY)
    assert clip_only.forward_teachers(batch) == {}
