"""SwALIP (docs/methods/swalip.md): CLIP 🚀 (without label smoothing) + weight x a swapped prediction of
Sinkhorn-Knopp assignments, added to clip_rocket's pass.

For strong image view l1 and strong caption view l2, the scores S = h_img,l1 H_txt,l2^T are the cosines of this
rank's h projections against the gathered batch of the other modality (the prototypes); text likewise. Targets:
Sinkhorn-Knopp on exp(S / epsilon), `iterations` rounds, normalised over every rank's rows; each
row then sums to 1. The prediction exp(rocket_logit_scale) S of (l1, l2) is trained toward the target of
(1 - l1, 1 - l2): L = sum over the 4 (l1, l2) of (CE_img + CE_txt) / 2, divided by 4.
"""

from dataclasses import dataclass

import torch

from model.collectives import all_reduce_sum, rank_and_world_size
from model.losses import soft_cross_entropy
from model.objectives.clip_rocket import RocketAddOn
from model.objectives.objective import WEIGHT_NOTE, register
from model.ranges import ranged


@torch.no_grad()
def sinkhorn_targets(scores, epsilon, iterations):
    """scores: (B, K) this rank's rows against K prototypes -> (B, K) assignments, each row summing to 1.

    Q = exp(S / epsilon), transposed to (K, B_all) over the B_all rows of every rank; it starts summing to 1, then
    each round makes every prototype's total 1/K (summed over ranks) and every row's total 1/B_all."""
    assignments = torch.exp(scores.float() / epsilon).T  # (K, B)
    prototypes, rows = assignments.shape[0], assignments.shape[1] * rank_and_world_size()[1]
    assignments /= all_reduce_sum(assignments.sum())
    for _ in range(iterations):
        assignments /= all_reduce_sum(assignments.sum(dim=1, keepdim=True)) * prototypes  # prototypes: 1/K each
        assignments /= assignments.sum(dim=0, keepdim=True) * rows  # rows: 1/B_all each
    return (assignments * rows).T


@register
class SwALIP(RocketAddOn):
    @dataclass
    class Settings:
        weight: float = ranged(0.2, "[0, inf)", note=WEIGHT_NOTE)
        epsilon: float = ranged(0.05, "(0, inf)")  # Sinkhorn-Knopp's entropy regularisation
        iterations: int = ranged(3, "[1, inf)")  # Sinkhorn-Knopp iterations

    name = "swalip"
    build_rank, pass_rank = 140, 140

    @classmethod
    def check(cls, settings, model_config):
        smoothing = model_config.objectives["clip_rocket"].label_smoothing
        if smoothing:
            raise ValueError(f"swalip trains CLIP 🚀 without label smoothing (model.objectives.clip_rocket."
                             f"label_smoothing={smoothing}): set it to 0")

    def term(self, model, features, teacher):
        settings, scale = self.settings, model.rocket_logit_scale.exp()
        image_scores = [[image @ texts.T for texts in features["h_text_all"]] for image in features["h_image"]]
        text_scores = [[text @ images.T for images in features["h_image_all"]] for text in features["h_text"]]
        image_targets = [[sinkhorn_targets(s, settings.epsilon, settings.iterations) for s in row]
                         for row in image_scores]
        text_targets = [[sinkhorn_targets(s, settings.epsilon, settings.iterations) for s in row]
                        for row in text_scores]
        terms = [(soft_cross_entropy(scale * image_scores[l1][l2], image_targets[1 - l1][1 - l2]) +
                  soft_cross_entropy(scale * text_scores[l1][l2], text_targets[1 - l1][1 - l2])) / 2
                 for l1 in range(2) for l2 in range(2)]
        loss = torch.stack(terms).sum() / 4
        return settings.weight * loss, {self.name: loss.detach()}
