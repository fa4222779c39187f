"""BarLIP (docs/methods/barlip.md): cross-modal Barlow Twins on CLIP 🚀's tower features, added to clip_rocket's pass.

Per modality a projector Linear(in -> hidden_dim)-BN-ReLU-Linear(-> hidden_dim)-BN-ReLU-Linear(-> dim)-BN(affine)
reads the features h reads (image CLS after the final norm, caption EOT features
after ln_final), each view on its own. For a pair (a, b) of (B, barlip_dim): C = a^T b / B, summed over ranks
(with gradient, so two ranks equal one) and divided by the world size;
L = scale [sum_i (C_ii - 1)^2 + off_diagonal_weight sum_{i != j} C_ij^2], averaged over the 5 (image, caption)
pairs: the weak pair and the 2x2 strong pairs. C is not standardised: the projectors' last BN does that.
"""

from dataclasses import dataclass

import torch

from model.batch_norm import SyncedBatchNorm1d, mlp
from model.collectives import all_reduce_sum_with_gradient, rank_and_world_size
from model.objectives.clip_rocket import RocketAddOn
from model.objectives.objective import WEIGHT_NOTE, register
from model.ranges import ranged


def barlow_projector(in_dim, settings):
    hidden = (settings.hidden_dim, settings.hidden_dim)
    return mlp(in_dim, hidden, settings.dim, last_norm=SyncedBatchNorm1d(settings.dim))


def barlow_loss(image, text, scale, off_diagonal_weight):
    """image, text: (B, K) projector outputs of this rank -> the Barlow Twins loss of their cross-correlation."""
    correlation = all_reduce_sum_with_gradient(image.float().T @ text.float() / image.shape[0])  # (K, K)
    correlation = correlation / rank_and_world_size()[1]
    identity = torch.eye(correlation.shape[0], device=correlation.device)
    squared = (correlation - identity).pow(2)
    on_diagonal = squared.diagonal().sum()
    return scale * (on_diagonal + off_diagonal_weight * (squared.sum() - on_diagonal))


@register
class BarLIP(RocketAddOn):
    @dataclass
    class Settings:
        hidden_dim: int = ranged(3000, "[1, inf)")  # its projectors' MLP width
        dim: int = ranged(8192, "[1, inf)")  # its projectors' output width
        scale: float = ranged(0.025, "(0, inf)")  # scale of the whole Barlow Twins loss
        off_diagonal_weight: float = ranged(5e-3, "[0, inf)", note=WEIGHT_NOTE)  # Barlow Twins' lambda

    name = "barlip"
    build_rank, pass_rank = 130, 130

    def networks(self, model):
        settings = self.settings
        return {"barlip_image_projector": lambda: barlow_projector(model.image_student.embed_dim, settings),
                "barlip_text_projector": lambda: barlow_projector(self.model_config.text_width, settings)}

    def term(self, model, features, teacher):
        settings = self.settings
        images = [model.barlip_image_projector(view) for view in features["image_cls"]]  # 3 x (B, barlip_dim)
        texts = [model.barlip_text_projector(view) for view in features["text_eot"]]
        pairs = [(images[0], texts[0])] + [(image, text) for image in images[1:] for text in texts[1:]]
        loss = torch.stack([barlow_loss(image, text, settings.scale, settings.off_diagonal_weight)
                            for image, text in pairs]).mean()
        return loss, {self.name: loss.detach()}
