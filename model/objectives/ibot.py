"""iBOT (docs/methods/harmony.md 2.1): CLS distillation across views and masked-patch distillation within each
global view.

With `patch_weight` 0 it is DINO (SILC's self-distillation, docs/methods/silc.md): the student sees its global
views unmasked and only the CLS term remains.
One pass per global view (the student head on its CLS and masked patches), then the local views (CLS only) in
near-equal groups of at most one global view's tokens; every term reads one student view and constant teacher
targets, so the passes' gradients are those of one backward. The centres are updated once, first.
The teacher iBOT head runs its last layer only where the loss and the centres read: CLS tokens, masked patches, the
mean patch.
"""

import itertools
from dataclasses import dataclass

import torch

from model.heads import ibot_head
from model.losses import ibot_loss_share, teacher_probs
from model.objectives.objective import WEIGHT_NOTE, Objective, register, update_center
from model.ranges import ranged


@dataclass
class DistillationSettings:
    """A self-distillation head and its loss (iBOT's, DetailCLIP's)."""

    cls_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)  # the CLS term
    patch_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)  # the masked-patch term; 0: DINO (CLS only)
    out_dim: int = ranged(8192, "[1, inf)")  # the head's output dimension (prototypes)
    head_hidden_dim: int = ranged(2048, "[1, inf)")  # the head's MLP width
    bottleneck_dim: int = ranged(256, "[1, inf)")  # the head's L2-normalized bottleneck
    student_temp: float = ranged(0.1, "(0, inf)")  # the student's softmax temperature
    center_momentum: float = ranged(0.9, "[0, 1]")  # EMA momentum of the teacher's output centres


def distillation_head(settings, embed_dim):
    return ibot_head(embed_dim, settings.out_dim, settings.head_hidden_dim, settings.bottleneck_dim)


def distillation_centers(settings):
    return {"ibot_cls_center": torch.zeros(1, settings.out_dim),
            "ibot_patch_center": torch.zeros(1, 1, settings.out_dim)}


@register
class IBOT(Objective):
    """Its teacher temperatures are optim.teacher_cls_temp and optim.teacher_patch_temp."""

    @dataclass
    class Settings(DistillationSettings):
        weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)

    name = "ibot"
    build_rank, pass_rank = 10, 10
    global_views = 2
    clipped = ("ibot_head",)
    frozen_first_epochs = ("ibot_head.last_layer",)
    schedules = ("teacher_cls_temp", "teacher_patch_temp")
    students = ("image_student",)
    teachers = ("image_student", "ibot_head")
    reads = ("global_crops", "local_crops")
    teacher_image_views = 2

    @property
    def patch_term(self):
        return self.settings.patch_weight > 0

    def networks(self, model):
        return {"ibot_head": lambda: distillation_head(self.settings, model.image_student.embed_dim)}

    def buffers(self):
        return distillation_centers(self.settings)

    def teacher_outputs(self, model, seen, views):
        """The image teacher's tokens (G, B, 1 + N, D) -> ibot_cls (G, B, K), ibot_masked_patches (n, K) in
        masks.nonzero() order, ibot_patch_mean (1, 1, K). The head's last layer is linear without bias, so the patch
        centre's statistic (the mean logit over every patch) is the last layer of the mean bottleneck."""
        head = model.teachers["ibot_head"]
        bottleneck = head.bottleneck(seen["image_tokens"][:2])  # (2, B, 1 + N, bottleneck_dim)
        patches = bottleneck[:, :, 1:]
        outputs = {"ibot_cls": head.last_layer(bottleneck[:, :, 0])}
        if self.patch_term:
            outputs["ibot_masked_patches"] = head.last_layer(patches[views["ibot_masks"].flatten(2)])
            outputs["ibot_patch_mean"] = head.last_layer(patches.mean(dim=(0, 1, 2)))[None, None]
        return outputs

    def passes(self, model, views, teacher, values):
        """global_crops: (2, B, 3, Hg, Wg); local_crops: (L, B, 3, Hl, Wl); ibot_masks: (2, B, Hg/p, Wg/p)."""
        settings = self.settings
        global_crops, local_crops = views["global_crops"], views["local_crops"]
        crops, batch, local_views = global_crops.shape[0], global_crops.shape[1], local_crops.shape[0]
        masks = views["ibot_masks"].flatten(2)  # (2, B, N)
        teacher_cls = teacher.pop("ibot_cls")
        cls_probs = teacher_probs(teacher_cls, model.ibot_cls_center, values["teacher_cls_temp"])  # (2, B, K)
        update_center(model.ibot_cls_center, teacher_cls.flatten(0, 1).mean(0, keepdim=True), settings.center_momentum)
        if self.patch_term:
            patch_probs = teacher_probs(teacher.pop("ibot_masked_patches"), model.ibot_patch_center[0],
                                        values["teacher_patch_temp"]).split(masks.sum(dim=(1, 2)).tolist())
            update_center(model.ibot_patch_center, teacher.pop("ibot_patch_mean"), settings.center_momentum)
        cls_pairs = crops * (crops + local_views - 1)  # (teacher view, other student view) pairs

        def share(student_cls, student_views, masked_patches, view_patch_probs, view_masks):
            loss, stats = ibot_loss_share(student_cls, student_views, masked_patches, cls_probs, view_patch_probs,
                                          view_masks, cls_pairs, settings.student_temp, settings.cls_weight,
                                          settings.patch_weight)
            return settings.weight * loss, {**stats, "ibot": loss.detach()}

        for view in range(crops):
            if self.patch_term:
                tokens = model.image_student(global_crops[view], patch_mask=views["ibot_masks"][view])  # (B, 1 + N, D)
                logits = model.ibot_head(torch.cat([tokens[:, 0], tokens[:, 1:][masks[view]]]))  # (B + n_v, K)
                yield share(logits[None, :batch], (view,), logits[batch:], patch_probs[view], masks[view:view + 1])
            else:  # DINO: the unmasked view, CLS only
                cls = model.ibot_head(model.image_student(global_crops[view])[:, 0])  # (B, K)
                yield share(cls[None], (view,), None, None, masks[:0])
        global_tokens = masks.shape[-1] + 1
        patch_size = self.model_config.patch_size
        local_tokens = (local_crops.shape[-2] // patch_size) * (local_crops.shape[-1] // patch_size) + 1
        passes = -(-local_views // max(1, global_tokens // local_tokens))  # ceil; 0 without local views
        bounds = [local_views * index // passes for index in range(passes + 1)] if passes else []
        for first, last in itertools.pairwise(bounds):  # near-equal groups
            tokens = model.image_student(local_crops[first:last].flatten(0, 1))  # ((last - first) * B, 1 + n, D)
            cls = model.ibot_head(tokens[:, 0]).unflatten(0, (last - first, batch))  # (views in group, B, K)
            yield share(cls, range(crops + first, crops + last), None, None, masks[:0])
