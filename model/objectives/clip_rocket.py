"""CLIP 🚀 (docs/methods/clip_rocket.md): a global CLIP term on the weak pair and a label-smoothed local term on the 2x2
strong pairs, with separate projectors and scales.

- global: the towers' own CLIP projections z of the weak image (1, B) and weak caption, scale exp(logit_scale),
  no smoothing;
- local: MLP projectors h (SyncBN) on the tower features before their CLIP projection (the image CLS token after
  the final norm, the caption's EOT features after ln_final), scale exp(rocket_logit_scale), label smoothing
  `label_smoothing`, mean over the 4 (strong image j, strong caption k) pairs; the strong captions go
  through the text tower with `text_dropout` on its residual stream;
- L_img = (L_g,img + 2 L_l,img) / 3, the same for text, L = (L_img + L_txt) / 2, x2 with loss mode `sum`.
Columns are gathered with gradient (docs/methods/README.md decision 3; the official gathers without).

The SSL add-ons (SiamLIP, BYOLIP, BarLIP, SwALIP) are `RocketAddOn`s: they read the same tower features, so their
terms join this objective's one backward pass (one forward of each view per step, as the official model) and
their own groups have no pass.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch_norm import mlp
from model.collectives import gather_with_gradient, rank_and_world_size
from model.losses import clip_loss
from model.objectives.clip import LOG_SCALE_INIT
from model.objectives.objective import Objective, check_logit_scale_max, clamp_logit_scales, register
from model.ranges import ranged

ROCKET_VIEWS = ("weak", "strong", "weak_text", "strong_text")


def rocket_mix(global_loss, local_loss, strong_views, loss_mode):
    """(L_g + n L_l) / (1 + n) with n strong views, x2 for loss mode `sum`. Both terms are already the mean of
    their image->text and text->image halves, and the mix is linear, so this is (L_img + L_txt) / 2."""
    loss = (global_loss + strong_views * local_loss) / (1 + strong_views)
    return 2 * loss if loss_mode == "sum" else loss


def tower_features(model, views, text_dropout):
    """The towers on the recipe's views, with gradient: image_cls (3, B, D) and text_eot (3, B, width) of
    [weak, strong 1, strong 2] (before any projection), z_image and z_text (B, clip_dim) of the weak pair."""
    weak, strong = views["weak"], views["strong"]  # (1, B, 3, H, W), (2, B, 3, H, W)
    batch = weak.shape[1]
    tokens = model.image_student(torch.cat([weak, strong]).flatten(0, 1))  # (3B, 1 + N, D)
    weak_eot, _ = model.text_student.encode(views["weak_text"][0])  # (B, width)
    strong_eot, _ = model.text_student.encode(views["strong_text"].flatten(0, 1), text_dropout)  # (2B, width)
    return {"image_cls": tokens[:, 0].unflatten(0, (3, batch)),
            "text_eot": torch.cat([weak_eot, strong_eot]).unflatten(0, (3, batch)),
            "z_image": model.image_student.embed_tokens(tokens[:batch]),
            "z_text": model.text_student.project(weak_eot)}


@register
class ClipRocket(Objective):
    """Its global term uses the towers' CLIP projections (model.clip_dim)."""

    @dataclass
    class Settings:
        hidden_dim: int = ranged(4096, "[1, inf)")  # the local projectors h: in -> 4096 -> 4096 -> dim (SyncBN)
        dim: int = ranged(256, "[1, inf)")  # the local projectors' output width
        logit_scale_init: float = ranged(LOG_SCALE_INIT, "(-inf, inf)")  # the global term's initial log scale
        local_logit_scale_init: float = ranged(math.log(10.0), "(-inf, inf)")  # the local term's: s_h = 1 / 0.1
        logit_scale_max: float = ranged(0.0, "[0, inf)")  # both scales clamped to [1, this]; 0 = never
        label_smoothing: float = ranged(0.1, "[0, 1)")  # local term only
        # residual-stream dropout on the strong captions (CC3M 0.2, CC12M 0.05)
        text_dropout: float = ranged(0.2, "[0, 1)")
        loss_mode: str = "avg"  # avg (CC3M) | sum (CC12M, YFCC: the loss x2)

    name = "clip_rocket"
    excludes = ("ibot", "clip", "mae", "detailclip")  # it holds its own CLIP terms on its own views
    build_rank, pass_rank = 100, 100
    students = ("image_student", "text_student")
    reads = ROCKET_VIEWS

    @classmethod
    def check(cls, settings, model_config):
        check_logit_scale_max(cls.name, settings.logit_scale_max)
        if settings.loss_mode not in ("avg", "sum"):
            raise ValueError(f"model.objectives.clip_rocket.loss_mode={settings.loss_mode!r}: choose avg (CC3M) or "
                             f"sum (CC12M, YFCC)")

    def networks(self, model):
        settings, width = self.settings, self.model_config.text_width
        hidden = (settings.hidden_dim, settings.hidden_dim)
        return {"logit_scale": lambda: nn.Parameter(torch.tensor(settings.logit_scale_init)),
                "rocket_logit_scale": lambda: nn.Parameter(torch.tensor(settings.local_logit_scale_init)),
                "rocket_image_projector": lambda: mlp(model.image_student.embed_dim, hidden, settings.dim),
                "rocket_text_projector": lambda: mlp(width, hidden, settings.dim)}

    def after_step(self, model):
        clamp_logit_scales(model, ("logit_scale", "rocket_logit_scale"), self.settings.logit_scale_max)

    def passes(self, model, views, teacher, values):
        settings = self.settings
        features = tower_features(model, views, settings.text_dropout)
        # Each view through the projector on its own, so its SyncBN normalises by that view's batch (as the official).
        features["h_image"] = [F.normalize(model.rocket_image_projector(cls), dim=-1)
                               for cls in features["image_cls"][1:]]  # 2 x (B, rocket_dim), L2-normalized
        features["h_text"] = [F.normalize(model.rocket_text_projector(eot), dim=-1) for eot in features["text_eot"][1:]]
        features["h_image_all"] = [gather_with_gradient(h) for h in features["h_image"]]  # 2 x (W*B, rocket_dim)
        features["h_text_all"] = [gather_with_gradient(h) for h in features["h_text"]]
        rank, _ = rank_and_world_size()
        z_image, z_text = F.normalize(features["z_image"], dim=-1), F.normalize(features["z_text"], dim=-1)
        global_loss, _ = clip_loss(z_image, z_text, gather_with_gradient(z_image), gather_with_gradient(z_text),
                                   model.logit_scale, rank)
        local_terms = [clip_loss(features["h_image"][j], features["h_text"][k], features["h_image_all"][j],
                                 features["h_text_all"][k], model.rocket_logit_scale, rank,
                                 label_smoothing=settings.label_smoothing)[0]
                       for j in range(2) for k in range(2)]
        local_loss = torch.stack(local_terms).mean()
        loss = rocket_mix(global_loss, local_loss, 2, settings.loss_mode)
        stats = {"rocket_global": global_loss.detach(), "rocket_local": local_loss.detach(),
                 "logit_scale": model.logit_scale.exp().detach(),
                 "rocket_logit_scale": model.rocket_logit_scale.exp().detach(), "clip_rocket": loss.detach()}
        for add_on in model.objectives.values():
            if isinstance(add_on, RocketAddOn):
                term, add_on_stats = add_on.term(model, features, teacher)
                loss = loss + term
                stats.update(add_on_stats)
        yield loss, stats


class RocketAddOn(Objective):
    """An SSL term on CLIP 🚀's tower features (`tower_features`, plus the strong views' L2-normalized h
    projections h_image, h_text (2 x (B, rocket_dim)) and their gathers h_image_all, h_text_all), added to
    clip_rocket's pass."""

    requires = ("clip_rocket",)  # its term joins CLIP 🚀's pass and reads its features
    students = ("image_student", "text_student")
    reads = ROCKET_VIEWS

    def term(self, model, features, teacher):
        """(weighted loss, metrics) of this add-on."""
        raise NotImplementedError

    def passes(self, model, views, teacher, values):
        return iter(())  # its term is in clip_rocket's pass
