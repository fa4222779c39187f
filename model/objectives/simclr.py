"""SLIP's SimCLR term (docs/methods/slip.md): the image student's CLS token (after the final norm, before the CLIP
projection) of each of the two `simclr` crops through the SimCLR head (D -> hidden -> hidden -> out, SyncBN, ReLU),
then NT-Xent at `temperature` with the keys gathered with gradient. SLIP's CLIP term is the `clip` objective on
the recipe's `global_crops` view. The head and the NT-Xent are A-CLIP's too (model/objectives/aclip.py)."""

from dataclasses import dataclass

import torch.nn.functional as F

from model.batch_norm import mlp
from model.collectives import gather_with_gradient, rank_and_world_size
from model.losses import simclr_loss
from model.objectives.objective import WEIGHT_NOTE, Objective, register
from model.ranges import ranged


def simclr_head(embed_dim, hidden_dim, out_dim):
    """SLIP's `image_mlp`: Linear-SyncBN-ReLU twice at hidden_dim, then Linear to out_dim."""
    return mlp(embed_dim, (hidden_dim,) * 2, out_dim)


def simclr_between(head_a, head_b, temperature):
    """NT-Xent of two views' head outputs (B, out) each, L2-normalized and gathered with gradient here."""
    view_a, view_b = F.normalize(head_a, dim=-1), F.normalize(head_b, dim=-1)
    return simclr_loss(view_a, view_b, gather_with_gradient(view_a), gather_with_gradient(view_b), temperature,
                       rank_and_world_size()[0])


@register
class SimCLR(Objective):
    @dataclass
    class Settings:
        weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        temperature: float = ranged(0.1, "(0, inf)", note="SLIP: 0.1")
        hidden_dim: int = ranged(4096, "[1, inf)")  # the head's MLP width
        out_dim: int = ranged(256, "[1, inf)")  # the head's output width

    name = "simclr"
    build_rank, pass_rank = 80, 30
    students = ("image_student",)
    reads = ("simclr",)

    def networks(self, model):
        settings = self.settings
        return {"simclr_head": lambda: simclr_head(model.image_student.embed_dim, settings.hidden_dim,
                                                   settings.out_dim)}

    def passes(self, model, views, teacher, values):
        crops = views["simclr"]  # (2, B, 3, H, W)
        cls = model.image_student(crops.flatten(0, 1))[:, 0].unflatten(0, crops.shape[:2])  # (2, B, D)
        # The head sees each view on its own, as SLIP's: batch statistics per view.
        loss, stats = simclr_between(model.simclr_head(cls[0]), model.simclr_head(cls[1]),
                                     self.settings.temperature)
        yield self.settings.weight * loss, stats
