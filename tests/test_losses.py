"""Each objective against a written-out computation of its formula, plus the properties it must have."""

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from model import losses
from model.masking import MASK_ID, mask_captions, real_token_mask

torch.manual_seed(0)


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def ce_row(logits_row, target_probs_row):
    """Cross entropy of one row, written out with explicit exp/log."""
    log_normalizer = math.log(sum(math.exp(v) for v in logits_row.tolist()))
    return -sum(p * (v - log_normalizer) for p, v in zip(target_probs_row.tolist(), logits_row.tolist(), strict=True))


def softmax_row(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values.tolist()]
    return torch.tensor([e / sum(exps) for e in exps])


def test_clip_hard_equals_open_clip():
    image, text = unit(6, 8), unit(6, 8)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    ours, _ = losses.clip_loss(image, text, image, text, logit_scale)
    reference = ClipLoss()(image, text, logit_scale.exp())
    torch.testing.assert_close(ours, reference)


def test_soft_cross_entropy_with_one_hot_targets_is_hard_cross_entropy():
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(losses.soft_cross_entropy(logits, F.one_hot(labels, 7).float()),
                               F.cross_entropy(logits, labels))


def test_clip_local_rows_against_gathered_columns_with_soft_targets():
    world, batch, rank, alpha = 3, 4, 1, 0.3
    image_all, text_all = unit(world * batch, 8), unit(world * batch, 8)
    teacher_image_all, teacher_text_all = unit(world * batch, 8), unit(world * batch, 8)
    rows = slice(rank * batch, (rank + 1) * batch)
    scale = torch.tensor(2.0)
    teacher = (teacher_image_all[rows], teacher_text_all[rows], teacher_image_all, teacher_text_all)
    loss, stats = losses.clip_loss(image_all[rows], text_all[rows], image_all, text_all, scale, rank, alpha, teacher)
    hard = soft = 0.0
    for i in range(batch):
        row = rank * batch + i
        logits_image = math.exp(2.0) * (text_all @ image_all[row])
        logits_text = math.exp(2.0) * (image_all @ text_all[row])
        one_hot = F.one_hot(torch.tensor(row), world * batch).float()
        hard += (ce_row(logits_image, one_hot) + ce_row(logits_text, one_hot)) / 2 / batch
        targets_image = softmax_row(teacher_text_all @ teacher_image_all[row], 0.1)
        targets_text = softmax_row(teacher_image_all @ teacher_text_all[row], 0.1)
        soft += (ce_row(logits_image, targets_image) + ce_row(logits_text, targets_text)) / 2 / batch
    torch.testing.assert_close(stats["clip_hard"], torch.tensor(hard), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["clip_soft"], torch.tensor(soft), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, torch.tensor(alpha * hard + (1 - alpha) * soft), rtol=1e-4, atol=1e-4)


def ibot_inputs(batch=3, patches=4, dim=5, local_views=2):
    student_cls = torch.randn(2 + local_views, batch, dim)
    student_patches, teacher_patches = torch.randn(2, batch, patches, dim), torch.randn(2, batch, patches, dim)
    masks = torch.rand(2, batch, patches) < 0.5
    masks[0, 0] = False  # an image with no mask adds 0 but still counts in the mean
    return dict(student_cls=student_cls, student_patches=student_patches, teacher_cls=torch.randn(2, batch, dim),
                teacher_patches=teacher_patches, masks=masks, cls_center=torch.randn(1, dim) * 0.1,
                patch_center=torch.randn(1, 1, dim) * 0.1, teacher_cls_temp=0.04, teacher_patch_temp=0.07)


def ibot_loss_on(inputs, view_groups=None):
    """The iBOT loss from the shares of the student views in `view_groups` (default: all in one share), as Harmony's
    passes compute it: student patch logits at the masked positions, teacher targets computed once."""
    masks, student_cls = inputs["masks"], inputs["student_cls"]
    views, local_views = masks.shape[0], student_cls.shape[0] - masks.shape[0]
    cls_probs = losses.teacher_probs(inputs["teacher_cls"], inputs["cls_center"], inputs["teacher_cls_temp"])
    patch_probs = losses.teacher_probs(inputs["teacher_patches"], inputs["patch_center"][0],
                                       inputs["teacher_patch_temp"])  # (2, B, N, K)
    total, stats = 0, {}
    for group in view_groups or [range(student_cls.shape[0])]:
        global_views = [view for view in group if view < views]
        group_masks = masks[global_views]
        loss, share = losses.ibot_loss_share(
            student_cls[list(group)], list(group), inputs["student_patches"][global_views][group_masks],
            cls_probs, patch_probs[global_views][group_masks], group_masks, views * (views + local_views - 1))
        total = total + loss
        stats = {name: stats.get(name, 0) + value for name, value in share.items()}
    return total, stats


def test_ibot_uniform_outputs_give_log_k():
    k = 16
    inputs = ibot_inputs(dim=k)
    for name in ("student_cls", "student_patches", "teacher_cls", "teacher_patches"):
        inputs[name] = torch.zeros_like(inputs[name])
    inputs["cls_center"], inputs["patch_center"] = torch.zeros(1, k), torch.zeros(1, 1, k)
    inputs["masks"][:] = True
    loss, _ = ibot_loss_on(inputs)
    torch.testing.assert_close(loss, torch.tensor(math.log(k)))


def test_ibot_matches_the_written_out_formula():
    inputs = ibot_inputs()
    loss, stats = ibot_loss_on(inputs)
    s_cls, t_cls, masks = inputs["student_cls"], inputs["teacher_cls"], inputs["masks"]
    cls_terms = []
    for q in range(2):
        for v in range(s_cls.shape[0]):
            if v != q:
                cls_terms.append(sum(ce_row(s_cls[v, b] / 0.1, softmax_row(t_cls[q, b] - inputs["cls_center"][0], 0.04))
                                     for b in range(s_cls.shape[1])) / s_cls.shape[1])
    patch_terms = []
    for q in range(2):
        per_image = []
        for b in range(masks.shape[1]):
            masked = [n for n in range(masks.shape[2]) if masks[q, b, n]]
            total = sum(ce_row(inputs["student_patches"][q, b, n] / 0.1,
                               softmax_row(inputs["teacher_patches"][q, b, n] - inputs["patch_center"][0, 0], 0.07))
                        for n in masked)
            per_image.append(total / max(len(masked), 1))
        patch_terms.append(sum(per_image) / len(per_image))
    assert len(cls_terms) == 2 * (s_cls.shape[0] - 1)
    expected_cls, expected_patch = sum(cls_terms) / len(cls_terms), sum(patch_terms) / 2
    torch.testing.assert_close(stats["ibot_cls"], torch.tensor(expected_cls), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["ibot_patch"], torch.tensor(expected_patch), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, torch.tensor(0.5 * expected_cls + 0.5 * expected_patch), rtol=1e-4, atol=1e-4)


def test_ibot_shares_of_any_split_of_the_views_add_up_to_the_loss():
    inputs = ibot_inputs(local_views=3)
    whole, whole_stats = ibot_loss_on(inputs)
    for split in ([[0], [1], [2, 3, 4]], [[0], [1], [2], [3, 4]], [[1, 3], [0, 2, 4]]):
        parts, part_stats = ibot_loss_on(inputs, split)
        torch.testing.assert_close(parts, whole)
        for name in ("ibot_cls", "ibot_patch"):
            torch.testing.assert_close(part_stats[name], whole_stats[name])


def test_ibot_ignores_unmasked_patches_and_gives_teachers_no_gradient():
    inputs = ibot_inputs()
    inputs["student_patches"].requires_grad_(True)
    inputs["teacher_patches"].requires_grad_(True)
    inputs["teacher_cls"].requires_grad_(True)
    loss, _ = ibot_loss_on(inputs)
    loss.backward()
    unmasked_grad = inputs["student_patches"].grad[~inputs["masks"]]
    assert unmasked_grad.abs().max() == 0 and inputs["student_patches"].grad[inputs["masks"]].abs().max() > 0
    assert inputs["teacher_patches"].grad is None and inputs["teacher_cls"].grad is None


def test_patchify_orders_row_col_channel():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = losses.patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # patch (row 0, col 1) of image 0: pixel (0, 2) channels 0..2 come first
    torch.testing.assert_close(patches[0, 1, :3], images[0, :, 0, 2])


def test_mae_uses_normalized_pixels_of_removed_patches_only():
    images, patch = torch.randn(2, 3, 8, 8), 4
    predictions = torch.randn(2, 4, 48, requires_grad=True)
    removed = torch.tensor([[True, False, True, False], [False, False, False, True]])
    loss, _ = losses.mae_loss(predictions, images, removed, patch)
    expected, count = 0.0, 0
    for b in range(2):
        for n in range(4):
            if removed[b, n]:
                row, col = divmod(n, 2)
                target = images[b, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4].permute(1, 2, 0).reshape(-1)
                target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                expected += ((predictions[b, n] - target) ** 2).mean().item()
                count += 1
    torch.testing.assert_close(loss, torch.tensor(expected / count), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert predictions.grad[~removed].abs().max() == 0


def captions():
    tokens = torch.zeros(4, 77, dtype=torch.long)
    for row, length in enumerate((3, 10, 30, 75)):
        tokens[row, 0] = 49406
        tokens[row, 1:length + 1] = torch.randint(1, 49000, (length,))
        tokens[row, length + 1] = 49407
    return tokens


def test_mlm_masking_never_touches_sot_eot_or_padding():
    tokens = captions().repeat(200, 1)
    masked_tokens, labels, masked = mask_captions(tokens, 0.2, torch.Generator().manual_seed(0))
    real = real_token_mask(tokens)
    eot = tokens == 49407
    assert not masked[:, 0].any() and not masked[eot].any() and not masked[~real].any()
    assert (masked_tokens[masked] == MASK_ID).all() and (masked_tokens[~masked] == tokens[~masked]).all()
    assert (labels[masked] == tokens[masked]).all() and (labels[~masked] == -100).all()
    maskable = real & ~eot
    maskable[:, 0] = False
    assert abs(masked.sum().item() / maskable.sum().item() - 0.2) < 0.02


def test_mlm_loss_is_cross_entropy_over_masked_positions():
    logits, labels = torch.randn(5, 11), torch.full((5,), -100)
    labels[2], labels[4] = 3, 7
    loss, _ = losses.mlm_loss(logits, labels, predict=torch.nn.Identity())
    first = F.cross_entropy(logits[2][None], torch.tensor([3]))
    second = F.cross_entropy(logits[4][None], torch.tensor([7]))
    expected = (first + second) / 2
    torch.testing.assert_close(loss, expected)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    predict = torch.nn.Linear(8, 11)
    for chunks in (1, 4):
        for rows in (5, 0):
            loss, _ = losses.mlm_loss(torch.randn(rows, 8, requires_grad=True), torch.full((rows,), -100), predict,
                                      chunks)
            assert loss.item() == 0.0


def test_mlm_loss_in_chunks_equals_the_whole_in_value_and_gradients():
    """The chunked linear + cross entropy (logits made a chunk at a time, again in the backward) is the same loss."""
    torch.manual_seed(3)
    states, labels = torch.randn(13, 16), torch.randint(0, 50, (13,))
    labels[[1, 6]] = -100  # ignored rows get no gradient
    results = []
    for chunks in (1, 4, 13, 20):
        predict = torch.nn.Linear(16, 50)
        torch.nn.init.normal_(predict.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(predict.bias, generator=torch.Generator().manual_seed(1))
        leaf = states.clone().requires_grad_(True)
        loss, _ = losses.mlm_loss(leaf, labels, predict, chunks)
        (3.0 * loss).backward()  # a loss scale reaches every gradient
        results.append((loss, leaf.grad, predict.weight.grad, predict.bias.grad))
    for chunked in results[1:]:
        for ours, whole in zip(chunked, results[0], strict=True):
            torch.testing.assert_close(ours, whole)
    assert results[0][1][[1, 6]].abs().max() == 0


def test_text_distillation_masked_tokens_only_and_centre_over_real_tokens():
    tokens = captions()
    real = real_token_mask(tokens)
    _, _, masked = mask_captions(tokens, 0.5, torch.Generator().manual_seed(1))
    student = torch.randn(4, 77, 6, requires_grad=True)
    teacher, center = torch.randn(4, 77, 6), torch.randn(1, 1, 6) * 0.1
    at_masked = masked.nonzero(as_tuple=True)  # the head's rows: the masked tokens only
    loss, stats = losses.text_distillation_loss(student[at_masked], teacher, at_masked, real, center,
                                                teacher_temp=0.04)
    per_caption = []
    for b in range(4):
        positions = masked[b].nonzero().flatten().tolist()
        total = sum(ce_row(student[b, t] / 0.1, softmax_row(teacher[b, t] - center[0, 0], 0.04)) for t in positions)
        per_caption.append(total / max(len(positions), 1))
    torch.testing.assert_close(loss, torch.tensor(sum(per_caption) / 4), rtol=1e-4, atol=1e-4)
    loss.backward()
    assert student.grad[~masked].abs().max() == 0
    torch.testing.assert_close(stats["teacher_token_sum"], teacher[real].sum(0))
    assert stats["teacher_token_count"] == real.sum()


def test_losses_run_under_bf16_autocast():
    inputs = ibot_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = ibot_loss_on(inputs)
    assert torch.isfinite(loss)
