"""The model's configuration: the towers, and the objectives it trains with their settings.

    model:
      vit_size: base
      objectives:
        clip: {soft_targets: true}
        ibot: {patch_weight: 0.5}

The towers' settings are this class's fields. Each objective (model/objectives/) declares its own settings; a config
enables an objective by naming it under `objectives` (`{}` or `true` for its defaults; `false` leaves out one a base
preset names). Building the config checks every setting's range, each objective's own checks, and which objectives
need or exclude each other, each with a one-line error naming the setting.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field

from model.objectives import OBJECTIVES, PASS_ORDER
from model.pooling import POOLINGS
from model.ranges import check_ranges, ranged
from model.vit import VIT_SIZES


def unknown_objective(name):
    close = difflib.get_close_matches(name, list(OBJECTIVES), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ValueError(f"model.objectives.{name}: no such objective; {hint}the objectives are {', '.join(OBJECTIVES)}")


def objective_settings(name, value):
    """The settings of objective `name` from a config value: its Settings, a dict of them, true (its defaults);
    None where the value is false or null (the objective left out)."""
    if name not in OBJECTIVES:
        raise unknown_objective(name)
    settings_class = OBJECTIVES[name].Settings
    if value is None or value is False:
        return None
    if value is True:
        return settings_class()
    if isinstance(value, dict):
        known = [setting.name for setting in dataclasses.fields(settings_class)]
        unknown = [key for key in value if key not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"model.objectives.{name}.{unknown[0]}: {name} has no such setting; {hint}its settings "
                             f"are {', '.join(known) or 'none'}")
        return settings_class(**value)
    if isinstance(value, settings_class):
        return value
    raise ValueError(f"model.objectives.{name}={value!r}: give its settings ({{}} or true for the defaults), or false "
                     f"to leave it out")


@dataclass
class ModelConfig:
    """The towers (defaults: Harmony's ViT-B/16 run) and the objectives by name (a preset names them)."""

    vit_size: str = "base"  # the image tower: micro | tiny | small | base | large
    patch_size: int = ranged(16, "[1, inf)")  # ViT patch side, pixels
    # side of the crops the image tower is built for; equal to data.global_crop_px
    global_crop_px: int = ranged(224, "[1, inf)")
    drop_path_rate: float = ranged(0.1, "[0, 1)")  # student only; teachers have none
    clip_pooling: str = "cls"  # cls | gap | max | map: what the image tower's contrastive embedding pools
    clip_dim: int = ranged(512, "[1, inf)")  # width of the shared image-text embedding
    text_width: int = ranged(512, "[1, inf)")  # text transformer's width
    text_layers: int = ranged(12, "[1, inf)")  # text transformer's blocks
    text_heads: int = ranged(8, "[1, inf)")  # text transformer's attention heads
    # Recompute each student transformer block (image, text, decoders) in the backward instead of keeping its
    # activations: less memory, about one more forward of time. Same values.
    activation_checkpointing: bool = False
    # the objectives it trains, by name, each with its settings (model/objectives/<name>.py)
    objectives: dict = field(default_factory=dict, metadata={"objectives": True})

    def __post_init__(self):
        check_ranges(self, "model.")
        if self.vit_size not in VIT_SIZES:
            raise ValueError(f"model.vit_size={self.vit_size!r} is not one of {sorted(VIT_SIZES)}")
        if self.clip_pooling not in POOLINGS:
            raise ValueError(f"model.clip_pooling={self.clip_pooling!r} is not one of {POOLINGS}")
        if self.global_crop_px % self.patch_size:
            raise ValueError(f"model.global_crop_px={self.global_crop_px} must be a multiple of patch_size "
                             f"(model.patch_size={self.patch_size})")
        given = {name: objective_settings(name, value) for name, value in self.objectives.items()}
        self.objectives = {name: given[name] for name in PASS_ORDER if given.get(name) is not None}
        if not self.objectives:
            raise ValueError(f"model.objectives names no objective: name at least one, e.g. "
                             f"model.objectives.clip={{}} (the objectives are {', '.join(OBJECTIVES)})")
        for name, settings in self.objectives.items():
            check_ranges(settings, f"model.objectives.{name}.")
        self._check_combination()
        for name, settings in self.objectives.items():
            OBJECTIVES[name].check(settings, self)
        self._check_heads()

    def _check_combination(self):
        for name in self.objectives:
            needed = [other for other in OBJECTIVES[name].requires if other not in self.objectives]
            if needed:
                raise ValueError(f"model.objectives.{name} needs {' and '.join(needed)}: add "
                                 f"{', '.join(f'model.objectives.{other}' for other in needed)} or leave {name} out")
            excluded = [other for other in OBJECTIVES[name].excludes if other in self.objectives]
            if excluded:
                raise ValueError(f"model.objectives.{name} cannot run with {', '.join(excluded)} (it replaces them or "
                                 f"reads the same networks otherwise): leave out one of them")

    def _check_heads(self):
        """Each transformer's width splits evenly over its attention heads (a transformer's own error would come
        from deep inside it, at the first step)."""
        attentions = [("model.text_heads", self.text_heads, "model.text_width", self.text_width)] \
            if self.uses_text else []
        for name, objective in self.built_objectives().items():
            attentions += [(f"model.objectives.{name}.{key}", heads, width_name, width)
                           for key, heads, width_name, width in objective.attention_heads()]
        for heads_name, heads, width_name, width in attentions:
            if width % heads:
                raise ValueError(f"{heads_name}={heads} does not divide {width_name} ({width}): each attention head "
                                 f"takes an equal share of the width; give a number of heads that divides {width}")

    def built_objectives(self):
        """{name: objective} of the enabled objectives, in the order their backward passes run."""
        return {name: OBJECTIVES[name](settings, self) for name, settings in self.objectives.items()}

    @property
    def uses_text(self):
        return any("text_student" in OBJECTIVES[name].students for name in self.objectives)

    @property
    def vit_embed_dim(self):
        return VIT_SIZES[self.vit_size].embed_dim

    @property
    def global_views(self):
        """How many global crops the objectives read (the data recipe makes 2 where any reads more than 1)."""
        return 2 if any(objective.global_views > 1 for objective in self.built_objectives().values()) else 1
