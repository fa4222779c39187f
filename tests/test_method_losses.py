"""The methods' losses (docs/methods/) against written-out computations of their formulas, gradients where subtle."""

import math

import torch
import torch.nn.functional as F

from model import losses, masking
from model.pooling import AttentionPool, pool_tokens

torch.manual_seed(0)


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def log_sigmoid(value):
    return -math.log(1 + math.exp(-value))


def test_siglip_is_the_sum_over_pairs_of_log_sigmoid_divided_by_the_batch():
    world, batch, rank = 2, 3, 1
    image_all, text_all = unit(world * batch, 4), unit(world * batch, 4)
    log_t, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0 + 3.0, dtype=torch.float64)
    rows = slice(rank * batch, (rank + 1) * batch)
    loss, stats = losses.siglip_loss(image_all[rows], text_all, log_t, bias, rank)
    expected = 0.0
    for i in range(rank * batch, (rank + 1) * batch):
        for j in range(world * batch):
            z = 1.0 if i == j else -1.0
            expected -= log_sigmoid(z * (10.0 * float(image_all[i] @ text_all[j]) - 7.0))
    torch.testing.assert_close(loss, torch.tensor(expected / batch, dtype=torch.float64))
    assert stats["logit_bias"] == -7.0 and math.isclose(float(stats["logit_scale"]), 10.0)


def test_siglip_bias_and_scale_gradients():
    """d/db = -(1/B) sum_ij z_ij (1 - sigma(z_ij l_ij)); d/dlog t = -(1/B) sum_ij z_ij (1 - sigma(z_ij l_ij)) t x.y."""
    batch = 4
    image, text = unit(batch, 5), unit(batch, 5)
    log_t = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    losses.siglip_loss(image, text, log_t, bias)[0].backward()
    grad_bias = grad_log_t = 0.0
    for i in range(batch):
        for j in range(batch):
            z, similarity = (1.0 if i == j else -1.0), float(image[i] @ text[j])
            logit = 10.0 * similarity - 10.0
            weight = -z * (1 - 1 / (1 + math.exp(-z * logit))) / batch
            grad_bias += weight
            grad_log_t += weight * 10.0 * similarity
    assert math.isclose(float(bias.grad), grad_bias, rel_tol=1e-9)
    assert math.isclose(float(log_t.grad), grad_log_t, rel_tol=1e-9)
    assert grad_bias < 0  # at b = -10 every logit is about -10: the positives push b up


def test_label_smoothing_targets_and_gradient():
    """Targets (1 - e) one-hot + e / N; the gradient of CE w.r.t. the logits is softmax - targets."""
    batch, epsilon = 3, 0.1
    image, text = unit(batch, 4), unit(batch, 4)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    image.requires_grad_(True)
    loss, _ = losses.clip_loss(image, text, image, text, logit_scale, label_smoothing=epsilon)
    scale = 1 / 0.07
    expected = 0.0
    for direction in ("image", "text"):
        for i in range(batch):
            row = [scale * float((image[i] @ text[j]) if direction == "image" else (text[i] @ image[j]))
                   for j in range(batch)]
            log_normalizer = math.log(sum(math.exp(value) for value in row))
            targets = [(1 - epsilon) * (i == j) + epsilon / batch for j in range(batch)]
            expected -= sum(t * (value - log_normalizer) for t, value in zip(targets, row, strict=True)) / batch / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    logits = (scale * image @ text.T).detach().requires_grad_(True)
    targets = (1 - epsilon) * torch.eye(batch, dtype=torch.float64) + epsilon / batch
    (-(targets * F.log_softmax(logits, dim=1)).sum(1).mean()).backward()
    torch.testing.assert_close(logits.grad, (F.softmax(logits.detach(), dim=1) - targets) / batch)


def test_masked_distillation_over_removed_patches_with_teacher_stop_gradient():
    batch, patches, dim, teacher_temp, student_temp = 2, 3, 4, 0.04, 0.1
    student = torch.randn(batch, patches, dim, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(batch, patches, dim, dtype=torch.float64, requires_grad=True)
    center = torch.randn(1, 1, dim, dtype=torch.float64) * 0.1
    removed = torch.tensor([[True, False, True], [False, True, False]])
    loss, stats = losses.masked_distillation_loss(student, teacher, removed, center, teacher_temp, student_temp)
    expected = 0.0
    for b in range(batch):
        terms = []
        for n in range(patches):
            if not removed[b, n]:
                continue
            t = [math.exp((float(teacher[b, n, k]) - float(center[0, 0, k])) / teacher_temp) for k in range(dim)]
            s = [float(student[b, n, k]) / student_temp for k in range(dim)]
            log_z = math.log(sum(math.exp(v) for v in s))
            terms.append(-sum(tk / sum(t) * (sk - log_z) for tk, sk in zip(t, s, strict=True)))
        expected += sum(terms) / len(terms) / batch
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(stats["teacher_patch_mean"], teacher.detach().mean((0, 1)))
    loss.backward()
    assert teacher.grad is None  # the targets are constants
    assert student.grad[0, 1].abs().sum() == 0 and student.grad[0, 0].abs().sum() > 0  # seen patches: no loss


def test_raw_pixel_reconstruction_without_per_patch_norm():
    images = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    predictions = torch.randn(1, 4, 12, dtype=torch.float64)
    removed = torch.tensor([[True, False, False, True]])
    loss, _ = losses.mae_loss(predictions, images, removed, 2, norm_pix=False)
    expected = 0.0
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        if removed[0, index]:
            pixels = [float(images[0, c, 2 * row + y, 2 * col + x])
                      for y in range(2) for x in range(2) for c in range(3)]  # (row, col, channel) inside a patch
            expected += sum((float(p) - q) ** 2 for p, q in zip(predictions[0, index], pixels, strict=True)) / 12 / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_poolings_written_out():
    tokens = torch.randn(2, 5, 3)
    torch.testing.assert_close(pool_tokens(tokens, "cls"), tokens[:, 0])
    gap = torch.stack([sum(tokens[b, n] for n in range(1, 5)) / 4 for b in range(2)])
    torch.testing.assert_close(pool_tokens(tokens, "gap"), gap)  # CLS excluded
    maximum = torch.tensor([[max(float(tokens[b, n, d]) for n in range(1, 5)) for d in range(3)] for b in range(2)])
    torch.testing.assert_close(pool_tokens(tokens, "max"), maximum)


def test_attention_pooling_is_one_probe_query_then_a_residual_mlp():
    torch.manual_seed(1)
    pool = AttentionPool(embed_dim=4, num_heads=2).double()
    tokens = torch.randn(2, 5, 4, dtype=torch.float64)
    attention = pool.attention
    q_weight, k_weight, v_weight = attention.in_proj_weight.chunk(3)
    q_bias, k_bias, v_bias = attention.in_proj_bias.chunk(3)
    query = pool.probe[0] @ q_weight.T + q_bias  # (1, 4)
    keys, values = tokens @ k_weight.T + k_bias, tokens @ v_weight.T + v_bias  # (2, 5, 4)
    heads = []
    for head in range(2):
        part = slice(2 * head, 2 * head + 2)
        scores = (keys[:, :, part] @ query[0, part]) / math.sqrt(2)  # (2, 5)
        heads.append((F.softmax(scores, dim=-1)[..., None] * values[:, :, part]).sum(1))  # (2, 2)
    attended = attention.out_proj(torch.cat(heads, dim=-1))  # (2, 4)
    expected = attended + pool.mlp(pool.norm(attended))
    torch.testing.assert_close(pool(tokens), expected)


def test_attentive_removal_keeps_the_most_attended_2x2_blocks():
    """A 4 x 4 grid: block means 1.5 (top left), 9.5 (top right), 5.5 (bottom left), 13.5 (bottom right); at
    ratio 0.5 int(4 * 0.5) + 1 = 3 blocks stay: all but the top left one."""
    attention = torch.arange(16.0).reshape(4, 4)
    attention = attention.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(1, 16)  # block b holds 4b .. 4b + 3
    keep, removed = masking.attentive_keep_indices(attention, (4, 4), 0.5)
    assert keep.tolist() == [[2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    assert removed.nonzero()[:, 1].tolist() == [0, 1, 4, 5]
