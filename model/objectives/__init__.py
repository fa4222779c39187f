"""The objectives a model is assembled from, one module each (model/objectives/objective.py says what one declares).

Every module of this package is imported here, and each objective registers itself (`@register`): a new objective is
one new module, listed nowhere else. `OBJECTIVES` holds them in the order their networks are built (which keeps
Harmony's initial weights those of the former single-class model); `PASS_ORDER` is the order their backward passes run
in a step (Harmony's official order first).
"""

import importlib
import pkgutil

from model.objectives import objective

for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{module.name}")

OBJECTIVES = dict(sorted(objective.REGISTRY.items(), key=lambda item: item[1].build_rank))
# The CLIP 🚀 add-ons (siamlip, byolip, barlip, swalip) run inside clip_rocket's pass; their own groups are empty.
PASS_ORDER = tuple(sorted(OBJECTIVES, key=lambda name: OBJECTIVES[name].pass_rank))
