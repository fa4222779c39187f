"""BYOLIP (docs/methods/siamlip_byolip.md): SiamLIP whose targets v come from an EMA copy of the towers and the SiamLIP
projectors (tau `optim.teacher_momentum` held constant by `optim.teacher_momentum_end`, 0.99 in the presets).

The copy runs as clip-rocket's momentum model: in training mode (its BN normalises by the batch), on the same
views, the strong captions with the same text dropout. It runs once per step without gradient.
"""

import torch

from model.objectives.objective import register
from model.objectives.siamlip import SIAM_HEADS, SiamLIP, project_views


@register
class BYOLIP(SiamLIP):
    name = "byolip"
    excludes = ("siamlip",)
    build_rank, pass_rank = 120, 120
    teachers = ("image_student", "text_student", *SIAM_HEADS)
    evaluates_students = True  # the momentum copy only gives targets; clip-rocket evaluates the online model

    def teacher_outputs(self, model, seen, views):
        """byolip_image_targets, byolip_text_targets: (3, B, siam_dim) of [weak, strong 1, strong 2]."""
        teachers, batch = model.teachers, views["weak"].shape[1]
        tokens = teachers["image_student"](torch.cat([views["weak"], views["strong"]]).flatten(0, 1))  # (3B, 1+N, D)
        weak_eot, _ = teachers["text_student"].encode(views["weak_text"][0])  # (B, width)
        strong_eot, _ = teachers["text_student"].encode(views["strong_text"].flatten(0, 1),
                                                        self.rocket_text_dropout)  # (2B, width)
        text_eot = torch.cat([weak_eot, strong_eot]).unflatten(0, (3, batch))
        return {"byolip_image_targets": torch.stack(project_views(teachers["siam_image_projector"],
                                                                  tokens[:, 0].unflatten(0, (3, batch)))),
                "byolip_text_targets": torch.stack(project_views(teachers["siam_text_projector"], text_eot))}

    @property
    def rocket_text_dropout(self):
        """CLIP 🚀's dropout on the strong captions, which the momentum copy applies too."""
        return self.model_config.objectives["clip_rocket"].text_dropout

    def targets(self, projected, teacher):
        return teacher.pop("byolip_image_targets"), teacher.pop("byolip_text_targets")
