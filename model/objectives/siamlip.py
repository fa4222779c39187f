"""SiamLIP (docs/methods/siamlip_byolip.md): cross-modal SimSiam on CLIP 🚀's tower features, added to
clip_rocket's pass.

Per modality a projector Linear(in -> hidden_dim, no bias)-BN-ReLU-Linear(-> dim, no bias)-BN(affine off) gives v,
and a predictor Linear(dim -> hidden_dim, no bias)-BN-ReLU-Linear(-> dim) gives p;
the image predictor aims at text targets and the text predictor at image targets. The heads read the features h
reads (the image CLS after the final norm, the caption's EOT features after ln_final), as clip-rocket's
`feats_image`/`feats_text` (models.py L496-506); the weak and strong views share the heads (no
`--separate-proj-child`), each view through them on its own (per-view BN statistics, as the official).
L_siam = mean of 10 terms 2 - 2 cos(p, stopgrad(v)): weak image -> weak text, weak text -> weak image, and the
4 + 4 (strong j, strong k) pairs of each direction. `siamlip_targets` gives v from the students (SiamLIP); BYOLIP
(model/objectives/byolip.py) reads it from their EMA copies.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch_norm import SyncedBatchNorm1d, mlp
from model.objectives.clip_rocket import RocketAddOn
from model.objectives.objective import register
from model.ranges import ranged

SIAM_HEADS = ("siam_image_projector", "siam_text_projector")


@dataclass
class SiamSettings:
    hidden_dim: int = ranged(2048, "[1, inf)")  # the predictor's MLP width
    dim: int = ranged(128, "[1, inf)")  # the projection width


def siam_projector(in_dim, settings):
    return mlp(in_dim, (settings.hidden_dim,), settings.dim, bias=False,
               last_norm=SyncedBatchNorm1d(settings.dim, affine=False))


def siam_predictor(settings):
    """Linear (no bias)-BN-ReLU, then a Linear with bias (the projector form's last layer swapped)."""
    return nn.Sequential(*mlp(settings.dim, (settings.hidden_dim,), settings.dim, bias=False)[:-1],
                         nn.Linear(settings.hidden_dim, settings.dim))


def negative_cosine(prediction, target):
    """2 - 2 cos(p, v) averaged over the rows; v carries no gradient."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target.detach(), dim=-1)).sum(-1).mean()


def siam_loss(image_predictions, text_predictions, image_targets, text_targets):
    """Each argument: 3 x (B, siam_dim) of [weak, strong 1, strong 2]. Mean of the 10 cross-modal terms."""
    terms = [negative_cosine(image_predictions[0], text_targets[0]),
             negative_cosine(text_predictions[0], image_targets[0])]
    for predictions, targets in ((image_predictions, text_targets), (text_predictions, image_targets)):
        terms += [negative_cosine(prediction, target) for prediction in predictions[1:] for target in targets[1:]]
    return torch.stack(terms).mean()


def project_views(projector, features):
    """(3, B, in) -> 3 x (B, siam_dim), each view through the projector on its own."""
    return [projector(view) for view in features]


@register
class SiamLIP(RocketAddOn):
    Settings = SiamSettings
    name = "siamlip"
    excludes = ("byolip",)  # BYOLIP is SiamLIP with EMA targets
    build_rank, pass_rank = 110, 110

    def networks(self, model):
        settings = self.settings
        return {"siam_image_projector": lambda: siam_projector(model.image_student.embed_dim, settings),
                "siam_text_projector": lambda: siam_projector(self.model_config.text_width, settings),
                "siam_image_predictor": lambda: siam_predictor(settings),
                "siam_text_predictor": lambda: siam_predictor(settings)}

    def targets(self, projected, teacher):
        """(image v, text v), each 3 x (B, siam_dim) of [weak, strong 1, strong 2]: the students' own projections."""
        return projected

    def term(self, model, features, teacher):
        image_v = project_views(model.siam_image_projector, features["image_cls"])
        text_v = project_views(model.siam_text_projector, features["text_eot"])
        image_targets, text_targets = self.targets((image_v, text_v), teacher)
        loss = siam_loss([model.siam_image_predictor(v) for v in image_v],
                         [model.siam_text_predictor(v) for v in text_v], image_targets, text_targets)
        return loss, {self.name: loss.detach()}
