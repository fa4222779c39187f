"""The objectives a model is assembled from, one module each (model/objectives/objective.py says what one declares).

`OBJECTIVES` is the registry, in the order their networks are built (which keeps Harmony's initial weights those of
the former single-class model); `PASS_ORDER` is the order their backward passes run in a step (Harmony's official
order first). A new objective is one module here, one entry in each, and the config switch that enables it.
"""

from model.objectives.aclip import ACLIP
from model.objectives.barlip import BarLIP
from model.objectives.byolip import BYOLIP
from model.objectives.clip import CLIP
from model.objectives.clip_rocket import ClipRocket
from model.objectives.detailclip import DetailCLIP
from model.objectives.ibot import IBOT
from model.objectives.mae import MAE
from model.objectives.masked_distillation import MaskedDistillation
from model.objectives.masked_text import MaskedText
from model.objectives.multimodal_mae import MultimodalMAE
from model.objectives.siamlip import SiamLIP
from model.objectives.simclr import SimCLR
from model.objectives.swalip import SwALIP

OBJECTIVES = {"ibot": IBOT, "clip": CLIP, "mae": MAE, "text": MaskedText, "masked_distillation": MaskedDistillation,
              "multimodal_mae": MultimodalMAE, "detailclip": DetailCLIP, "simclr": SimCLR, "aclip": ACLIP,
              "clip_rocket": ClipRocket, "siamlip": SiamLIP, "byolip": BYOLIP, "barlip": BarLIP, "swalip": SwALIP}
# The CLIP 🚀 add-ons (siamlip, byolip, barlip, swalip) run inside clip_rocket's pass; their own groups are empty.
PASS_ORDER = ("ibot", "clip", "simclr", "detailclip", "aclip", "text", "mae", "masked_distillation", "multimodal_mae",
              "clip_rocket", "siamlip", "byolip", "barlip", "swalip")
