"""Every objective's loss as a pure function: tensors in, (loss, statistics) out.

Harmony's five follow docs/methods/harmony.md section 2 (the official code), with our decision #2:
the text-distillation centre statistics are teacher logits over real tokens only. SigLIP, label smoothing,
masked self-distillation (MaskCLIP), raw-pixel reconstruction (M3AE), SimCLR's NT-Xent (SLIP, A-CLIP) and
BYOL (A-CLIP) follow their pages in docs/methods/.
Distributed gathers and all-reduces are the caller's job: functions take the gathered
tensors and return the local statistics the caller reduces.
"""

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, target_probs):
    """Mean over rows of -sum(target * log_softmax(logits)); equals cross_entropy for one-hot targets."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def clip_loss(image_local, text_local, image_all, text_all, logit_scale, rank=0,
              hard_weight=1.0, teacher=None, soft_temperature=0.1, label_smoothing=0.0):
    """CLIP InfoNCE over local rows x gathered columns, mixed with soft targets.

    image_local, text_local: (B, D) L2-normalized student embeddings of this rank.
    image_all, text_all: (W*B, D) the same, gathered over the W ranks (with gradient).
    logit_scale: the learnable log-scale; logits use exp(logit_scale), unclamped.
    teacher: None, or (image_local, text_local, image_all, text_all) of the EMA teachers,
        L2-normalized; then loss = hard_weight * hard + (1 - hard_weight) * soft.
    label_smoothing: the hard targets are (1 - e) * one-hot + e / (W*B) over the gathered columns (torch's).
    """
    scale = logit_scale.exp()
    logits_image = scale * image_local @ text_all.T  # (B, W*B)
    logits_text = scale * text_local @ image_all.T  # (B, W*B)
    labels = rank * image_local.shape[0] + torch.arange(image_local.shape[0], device=image_local.device)
    hard = (F.cross_entropy(logits_image, labels, label_smoothing=label_smoothing) +
            F.cross_entropy(logits_text, labels, label_smoothing=label_smoothing)) / 2
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


def siglip_loss(image_local, text_all, logit_scale, logit_bias, rank=0):
    """SigLIP: -sum over pairs of log sigmoid(z_ij * (t * x_i . y_j + b)), z = +1 on the diagonal, -1 elsewhere,
    divided by the local batch: this rank's rows against every rank's captions, so the mean over ranks (the
    gradient average) is big_vision's sum over the N x N pairs divided by N.

    image_local: (B, D) L2-normalized; text_all: (W*B, D) L2-normalized, gathered with gradient;
    logit_scale: log t (unclamped); logit_bias: b.
    """
    scale = logit_scale.exp()
    logits = scale * image_local @ text_all.T + logit_bias  # (B, W*B)
    batch = image_local.shape[0]
    rows = torch.arange(batch, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rank * batch + rows] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / batch
    return loss, {"siglip": loss.detach(), "logit_scale": scale.detach(), "logit_bias": logit_bias.detach()}


def simclr_loss(view_a_local, view_b_local, view_a_all, view_b_all, temperature=0.1, rank=0):
    """SLIP's NT-Xent (docs/methods/slip.md): each local row of one view is scored against the other view's gathered
    rows (its positive at its own global index) and its own view's gathered rows without itself, 2N - 1 candidates, over
    the temperature; the loss is the mean of the two views' cross-entropies.

    view_a_local, view_b_local: (B, D) L2-normalized; view_a_all, view_b_all: (W*B, D), gathered with gradient.
    """
    batch = view_a_local.shape[0]
    labels = rank * batch + torch.arange(batch, device=view_a_local.device)
    itself = F.one_hot(labels, view_a_all.shape[0]).bool()  # (B, W*B): a row's own column in its own view

    def one_view(query, other_all, own_all):
        across = query @ other_all.T / temperature  # (B, W*B)
        within = (query @ own_all.T / temperature).masked_fill(itself, float("-inf"))  # (B, W*B)
        return F.cross_entropy(torch.cat([across, within], dim=1), labels)

    loss = (one_view(view_a_local, view_b_all, view_a_all) + one_view(view_b_local, view_a_all, view_b_all)) / 2
    return loss, {"simclr": loss.detach()}


def byol_loss(predictions, targets):
    """BYOL's regression (A-CLIP, docs/methods/aclip.md): mean over rows of 2 - 2 cos(prediction, target); (n, D) each,
    the targets constant (an EMA network's output)."""
    loss = (2 - 2 * F.cosine_similarity(predictions, targets.detach(), dim=-1)).mean()
    return loss, {"byol": loss.detach()}


def teacher_probs(teacher_logits, center, temperature):
    """softmax((logits - center) / temperature), detached: the distillation targets."""
    return F.softmax((teacher_logits - center) / temperature, dim=-1).detach()


def ibot_loss_share(student_cls, student_views, student_masked_patches, teacher_cls_probs, teacher_patch_probs,
                    masks, cls_pairs, student_temp=0.1, cls_weight=0.5, patch_weight=0.5):
    """The part of the iBOT loss that some student views contribute; the parts over all views add up to the loss.

    iBOT is CLS distillation across views and masked-patch distillation within a global view. Every term reads
    one student view and constant teacher targets, so the views can be split into backward passes.
    student_cls: (V, B, K) student CLS logits of the views numbered `student_views` (0 and 1 are the global
    views, 2.. the local ones). teacher_cls_probs: (T, B, K) over the T = 2 teacher (global) views.
    student_masked_patches: (n, K) student logits at the masked patches of the global views among them, in
    `masks.nonzero()` order (unmasked patches carry no loss); masks: (G, B, N) bool for those G global views
    (G = 0 for local views only); teacher_patch_probs: (n, K), the matching targets.
    cls_pairs: the number of (teacher view, other student view) pairs in the whole loss, 2 * (2 + locals - 1).
    The CLS loss is the mean over all pairs of the mean over images; the patch loss the mean over the T global
    views and their images of each image's mean over its masked patches (0 with none).
    """
    views, batch = teacher_cls_probs.shape[:2]
    if student_cls.shape[:2] != (len(student_views), batch):
        raise ValueError(f"student_cls has shape {tuple(student_cls.shape)}: expected ({len(student_views)} views, "
                         f"{batch} images, K) for student_views={list(student_views)}")
    student_cls_logp = F.log_softmax(student_cls / student_temp, dim=-1)  # (V, B, K)
    cls_terms = [-(teacher_cls_probs[teacher_view] * student_cls_logp[index]).sum(-1).mean()
                 for teacher_view in range(views) for index, student_view in enumerate(student_views)
                 if student_view != teacher_view]
    cls = torch.stack(cls_terms).sum() / cls_pairs
    patch = student_cls.new_zeros(())
    if masks.shape[0]:
        masked = masks.nonzero(as_tuple=True)  # (view, image, patch) of each masked patch
        per_patch = -(teacher_patch_probs * F.log_softmax(student_masked_patches / student_temp, dim=-1)).sum(-1)
        image_share = (masks.float() / masks.sum(-1, keepdim=True).clamp(min=1))[masked]  # 1 / its image's masked
        patch = (per_patch * image_share).sum() / (views * batch)
    stats = {"ibot_cls": cls.detach(), "ibot_patch": patch.detach()}
    return cls_weight * cls + patch_weight * patch, stats


def patchify(images, patch_size):
    """(B, 3, H, W) -> (B, H/p * W/p, p*p*3), values ordered (row, col, channel) inside a patch."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, p, p, C)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def mae_loss(predictions, images, removed, patch_size, norm_pix=True):
    """MAE on one crop: per-patch normalized pixels, squared error, mean over removed patches only.

    predictions: (B, N, p*p*3); images: (B, 3, H, W), the same augmented crop the encoder saw;
    removed: (B, N) bool, True where the encoder did not see the patch. norm_pix=False: the target is the
    crop's pixels as they are (already normalized with the dataset's mean and std), as M3AE.
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((predictions - target) ** 2).mean(dim=-1)  # (B, N)
    removed = removed.float()
    loss = (per_patch * removed).sum() / removed.sum()
    return loss, {"mae": loss.detach()}


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of row_weights * cross_entropy(states @ weight.T + bias, labels), ignoring labels -100, with the
    logits made `chunks` rows at a time in the forward and again in the backward, where each chunk's gradients are
    added into one buffer per input. (Checkpointing each chunk would also bound the logits, but autograd would then
    hold one weight-sized gradient per chunk before summing them.)"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, states, weight, bias, labels, row_weights, chunks):
        ctx.save_for_backward(states, weight, bias, labels, row_weights)
        ctx.chunks = chunks
        return sum((F.cross_entropy(F.linear(part, weight, bias).float(), part_labels, ignore_index=-100,
                                    reduction="none") * part_weights).sum()
                   for part, part_labels, part_weights in zip(states.tensor_split(chunks), labels.tensor_split(chunks),
                                                              row_weights.tensor_split(chunks), strict=True))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_summed):
        states, weight, bias, labels, row_weights = ctx.saved_tensors
        grad_states = torch.empty_like(states)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for rows in torch.arange(len(states), device=states.device).tensor_split(ctx.chunks):
            part, part_labels = states[rows], labels[rows]
            # d(summed)/d(logits) = row weight * (softmax(logits) - one-hot(labels)), 0 on ignored rows: (rows, V)
            grad_logits = torch.softmax(F.linear(part.to(weight.dtype), weight, bias).float(), dim=-1)
            labelled = (part_labels != -100).nonzero()[:, 0]
            grad_logits[labelled, part_labels[labelled]] -= 1.0
            grad_logits[part_labels == -100] = 0.0
            grad_logits *= row_weights[rows, None] * grad_summed
            grad_states[rows] = (grad_logits @ weight.float()).to(states.dtype)
            grad_weight.addmm_(grad_logits.T.to(weight.dtype), part.to(weight.dtype))
            grad_bias += grad_logits.sum(dim=0).to(bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None, None


def mlm_loss(states, labels, predict, chunks=1, row_weights=None):
    """Cross entropy of predict(states) over the labelled positions (labels -100 elsewhere): their mean, or with
    `row_weights` (n,) the weighted sum; 0, not NaN, when none is labelled.

    states: (n, width) the states at the masked positions (or any rows) and labels (n,); predict: the vocabulary
    projection, an nn.Linear (width -> V). With chunks > 1 the (n, V) logits, MLM's largest tensors (49409
    per row), are made that many rows at a time, in the forward and the backward, and never exist at once.
    Same value and gradients."""
    weights = torch.ones(len(labels), device=labels.device) if row_weights is None else row_weights.float()
    if chunks == 1:
        per_row = F.cross_entropy(predict(states).float(), labels, ignore_index=-100, reduction="none")
        summed = (per_row * weights).sum()
    else:
        summed = _ChunkedLinearCrossEntropy.apply(states, predict.weight, predict.bias, labels, weights, chunks)
    loss = summed / (labels != -100).sum().clamp(min=1) if row_weights is None else summed
    return loss, {"mlm": loss.detach()}


def per_caption_weights(masked):
    """Row weights for mlm_loss that give M3AE's text loss: each caption's mean over its masked tokens, then the
    mean over captions (a caption with none masked counts 0). masked: (B, T) bool; returns (masked.sum(),) in the
    order of `tensor[masked]`."""
    per_caption = masked.sum(dim=-1, keepdim=True).clamp(min=1) * masked.shape[0]  # (B, 1)
    return (1.0 / per_caption).expand_as(masked)[masked]


def text_distillation_loss(student_tokens, teacher_tokens, at_masked, real_tokens, center,
                           teacher_temp, student_temp=0.1):
    """Patch-style distillation over word tokens, on masked tokens only: each caption's mean over its masked
    tokens, then the mean over captions (a caption with none masked counts 0).

    student_tokens: (M, K) head outputs at the masked positions of the masked captions (the head runs on those rows
    only); teacher_tokens: (B, T, K) on raw captions; at_masked: ((M,) caption, (M,) position) of each masked token,
    as masked.nonzero(as_tuple=True) gives them; real_tokens: (B, T) bool, SOT..EOT; center: (1, 1, K).
    Statistics for the centre (decision #2, teacher logits over real tokens): the local
    teacher_token_sum (K,) and teacher_token_count, which the caller all-reduces and divides.
    """
    targets = teacher_probs(teacher_tokens[at_masked], center[0], teacher_temp)  # (M, K)
    per_token = -(targets * F.log_softmax(student_tokens / student_temp, dim=-1)).sum(-1)  # (M,)
    # (B, T), zero where not masked: distinct positions, so the sums are the dense formula's, and deterministic
    per_position = per_token.new_zeros(real_tokens.shape).index_put_(at_masked, per_token)
    masked = per_token.new_zeros(real_tokens.shape).index_put_(at_masked, per_token.new_ones(()))  # (B, T)
    per_caption = per_position.sum(-1) / masked.sum(-1).clamp(min=1.0)  # (B,)
    loss = per_caption.mean()
    real = real_tokens.float().unsqueeze(-1)  # (B, T, 1)
    stats = {
        "text_distillation": loss.detach(),
        "teacher_token_sum": (teacher_tokens.detach() * real).sum(dim=(0, 1)),  # (K,)
        "teacher_token_count": real.sum(),
    }
    return loss, stats


def masked_distillation_loss(student_tokens, teacher_tokens, removed, center, teacher_temp, student_temp=0.1):
    """MaskCLIP's masked self-distillation (Harmony's re-implementation, docs/methods/maskclip.md).

    student_tokens: (B, N, K) decoder outputs from the masked image; teacher_tokens: (B, N, K) the EMA teacher's
    patch tokens of the full image; removed: (B, N) bool, the patches the student did not see; center: (1, 1, K).
    Per patch CE(softmax((t - c) / teacher_temp), log_softmax(s / student_temp)), each image's mean over its removed
    patches, then the mean over images. Statistics: the local mean teacher patch token (1, 1, K) for the centre.
    """
    targets = teacher_probs(teacher_tokens, center, teacher_temp)
    per_patch = -(targets * F.log_softmax(student_tokens / student_temp, dim=-1)).sum(-1)  # (B, N)
    removed = removed.float()
    loss = ((per_patch * removed).sum(-1) / removed.sum(-1).clamp(min=1.0)).mean()
    return loss, {"masked_distillation": loss.detach(), "teacher_patch_mean": teacher_tokens.detach().mean((0, 1))}
