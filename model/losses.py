"""The five Harmony objectives as pure functions: tensors in, (loss, statistics) out.

Formulas follow ../shared/HARMONY.md section 2 (the official code), with our decision #2:
the text-distillation centre statistics are teacher logits over real tokens only.
Distributed gathers and all-reduces are the caller's job: functions take the gathered
tensors and return the local statistics the caller reduces.
"""

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, target_probs):
    """Mean over rows of -sum(target * log_softmax(logits)); equals cross_entropy for one-hot targets."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def clip_loss(image_local, text_local, image_all, text_all, logit_scale, rank=0,
              hard_weight=1.0, teacher=None, soft_temperature=0.1):
    """CLIP InfoNCE over local rows x gathered columns, mixed with soft targets.

    image_local, text_local: (B, D) L2-normalized student embeddings of this rank.
    image_all, text_all: (W*B, D) the same, gathered over the W ranks (with gradient).
    logit_scale: the learnable log-scale; logits use exp(logit_scale), unclamped.
    teacher: None, or (image_local, text_local, image_all, text_all) of the EMA teachers,
        L2-normalized; then loss = hard_weight * hard + (1 - hard_weight) * soft.
    """
    scale = logit_scale.exp()
    logits_image = scale * image_local @ text_all.T  # (B, W*B)
    logits_text = scale * text_local @ image_all.T  # (B, W*B)
    labels = rank * image_local.shape[0] + torch.arange(image_local.shape[0], device=image_local.device)
    hard = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
    stats = {"clip_hard": hard.detach(), "logit_scale": scale.detach()}
    if teacher is None or hard_weight == 1.0:
        return hard, stats
    teacher_image_local, teacher_text_local, teacher_image_all, teacher_text_all = teacher
    with torch.no_grad():
        targets_image = F.softmax(teacher_image_local @ teacher_text_all.T / soft_temperature, dim=1)
        targets_text = F.softmax(teacher_text_local @ teacher_image_all.T / soft_temperature, dim=1)
    soft = (soft_cross_entropy(logits_image, targets_image) + soft_cross_entropy(logits_text, targets_text)) / 2
    stats["clip_soft"] = soft.detach()
    return hard_weight * hard + (1 - hard_weight) * soft, stats


def _teacher_probs(teacher_logits, center, temperature):
    return F.softmax((teacher_logits - center) / temperature, dim=-1).detach()


def ibot_loss(student_cls, student_masked_patches, teacher_cls, teacher_patches, masks, cls_center, patch_center,
              teacher_cls_temp, teacher_patch_temp, student_temp=0.1, cls_weight=0.5, patch_weight=0.5):
    """iBOT: CLS distillation across views and masked-patch distillation within a view.

    student_cls: (Vs, B, K) for Vs = 2 global + L local views; teacher_cls: (2, B, K).
    student_masked_patches: (n, K) student logits at the n masked patches of the global views, in
    `masks.nonzero()` order: unmasked patches carry no loss, so the student head skips them.
    teacher_patches: (2, B, N, K), all patches (the centre reads them all); masks: (2, B, N) bool.
    cls_center: (1, K); patch_center: (1, 1, K).
    Each image's patch term is the mean over its masked patches (0 with none); each view's term is the mean
    over its B images. Statistics include the centre updates' batch means (of raw teacher logits) for the
    caller to all-reduce: teacher_cls_mean (1, K) and teacher_patch_mean (1, 1, K).
    """
    views, batch = masks.shape[:2]
    masked = masks.nonzero(as_tuple=True)  # (view, image, patch) of each masked patch
    teacher_cls_probs = _teacher_probs(teacher_cls, cls_center, teacher_cls_temp)  # (2, B, K)
    teacher_patch_probs = _teacher_probs(teacher_patches[masked], patch_center[0], teacher_patch_temp)  # (n, K)
    student_cls_logp = F.log_softmax(student_cls / student_temp, dim=-1)  # (Vs, B, K)
    per_patch = -(teacher_patch_probs * F.log_softmax(student_masked_patches / student_temp, dim=-1)).sum(-1)
    image_share = (masks.float() / masks.sum(-1, keepdim=True).clamp(min=1))[masked]  # 1 / masked patches of its image
    patch = (per_patch * image_share).sum() / (views * batch)  # mean over views of the mean over images
    cls_terms = [-(teacher_cls_probs[teacher_view] * student_cls_logp[student_view]).sum(-1).mean()
                 for teacher_view in range(teacher_cls.shape[0]) for student_view in range(student_cls.shape[0])
                 if student_view != teacher_view]
    cls = torch.stack(cls_terms).mean()
    stats = {
        "ibot_cls": cls.detach(),
        "ibot_patch": patch.detach(),
        "teacher_cls_mean": teacher_cls.detach().flatten(0, 1).mean(0, keepdim=True),  # (1, K)
        # Mean over the patches of each image, then over images: (1, 1, K).
        "teacher_patch_mean": teacher_patches.detach().flatten(0, 1).mean(1).mean(0, keepdim=True)[None],
    }
    return cls_weight * cls + patch_weight * patch, stats


def patchify(images, patch_size):
    """(B, 3, H, W) -> (B, H/p * W/p, p*p*3), values ordered (row, col, channel) inside a patch."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, p, p, C)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def mae_loss(predictions, images, removed, patch_size):
    """MAE on one crop: per-patch normalized pixels, squared error, mean over removed patches only.

    predictions: (B, N, p*p*3); images: (B, 3, H, W), the same augmented crop the encoder saw;
    removed: (B, N) bool, True where the encoder did not see the patch.
    """
    target = patchify(images, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((predictions - target) ** 2).mean(dim=-1)  # (B, N)
    removed = removed.float()
    loss = (per_patch * removed).sum() / removed.sum()
    return loss, {"mae": loss.detach()}


def mlm_loss(logits, labels):
    """Mean cross entropy over masked positions (labels -100 elsewhere); 0, not NaN, when none is masked.

    logits: (..., V); labels: (...), e.g. (B, T, V) and (B, T), or only the masked positions (n, V) and (n,)."""
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.flatten(), ignore_index=-100,
                             reduction="sum")
    loss = summed / (labels != -100).sum().clamp(min=1)
    return loss, {"mlm": loss.detach()}


def text_distillation_loss(student_tokens, teacher_tokens, masked, real_tokens, center,
                           teacher_temp, student_temp=0.1):
    """Patch-style distillation over word tokens, on masked tokens only.

    student_tokens: (B, T, K) head outputs on masked captions; teacher_tokens: (B, T, K) on raw
    captions; masked: (B, T) bool; real_tokens: (B, T) bool, SOT..EOT; center: (1, 1, K).
    Statistics for the centre (decision #2, teacher logits over real tokens): the local
    teacher_token_sum (K,) and teacher_token_count, which the caller all-reduces and divides.
    """
    teacher_probs = _teacher_probs(teacher_tokens, center, teacher_temp)
    per_token = -(teacher_probs * F.log_softmax(student_tokens / student_temp, dim=-1)).sum(-1)  # (B, T)
    masked = masked.float()
    per_caption = (per_token * masked).sum(-1) / masked.sum(-1).clamp(min=1.0)  # (B,)
    loss = per_caption.mean()
    real = real_tokens.float().unsqueeze(-1)  # (B, T, 1)
    stats = {
        "text_distillation": loss.detach(),
        "teacher_token_sum": (teacher_tokens.detach() * real).sum(dim=(0, 1)),  # (K,)
        "teacher_token_count": real.sum(),
    }
    return loss, stats
