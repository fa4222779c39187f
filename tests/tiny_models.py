"""Model configs at tiny shapes for tests: hand-named objectives, or a preset's objectives with their settings."""

import dataclasses

import torch

from model.meta_arch import MetaArch, ModelConfig
from train.config import enabled_settings_overrides, load_config

TINY_TOWERS = dict(vit_size="micro", patch_size=8, global_crop_px=32, drop_path_rate=0.0, clip_dim=32, text_width=64,
                   text_layers=2, text_heads=4)
# each objective's sizes at tiny shapes (applied to the objectives a config enables)
TINY_SETTINGS = {
    "ibot": dict(out_dim=64, head_hidden_dim=64, bottleneck_dim=32),
    "mae": dict(decoder_width=32, decoder_depth=1, decoder_heads=4),
    "masked_text": dict(mlm_decoder_depth=1, mlm_decoder_heads=4, distillation_out_dim=32,
                        distillation_head_hidden_dim=64, bottleneck_dim=32, mask_probability=0.5),
    "masked_distillation": dict(decoder_heads=4),
    "multimodal_mae": dict(decoder_width=32, decoder_depth=1, decoder_heads=4),
    "detailclip": dict(out_dim=64, head_hidden_dim=64, bottleneck_dim=32, decoder_heads=4),
    "simclr": dict(hidden_dim=32, out_dim=16),
    "aclip": dict(simclr_hidden_dim=32, simclr_out_dim=16, byol_hidden_dim=32, byol_out_dim=16),
    "clip_rocket": dict(hidden_dim=32, dim=16),
    "siamlip": dict(hidden_dim=32, dim=16),
    "byolip": dict(hidden_dim=32, dim=16),
    "barlip": dict(hidden_dim=32, dim=24),
}
HARMONY = {"ibot": {}, "clip": {"soft_targets": True}, "mae": {}, "masked_text": {}}


def _tiny_settings(name, settings):
    """`settings` (a dict of overrides, or an objective's Settings) at tiny sizes; its own values win in a dict;
    false or None (the objective left out) as it is."""
    if settings is None or isinstance(settings, bool):
        return settings
    if isinstance(settings, dict):
        return {**TINY_SETTINGS.get(name, {}), **settings}
    return dataclasses.replace(settings, **TINY_SETTINGS.get(name, {}))


def tiny_config(objectives=None, **towers):
    """ModelConfig of `objectives` ({name: settings overrides}; Harmony's by default) at tiny shapes."""
    objectives = HARMONY if objectives is None else objectives
    return ModelConfig(**{**TINY_TOWERS, **towers},
                       objectives={name: _tiny_settings(name, settings) for name, settings in objectives.items()})


def tiny_preset_config(preset, **towers):
    """The preset's objectives, with their settings, at tiny shapes."""
    return ModelConfig(**{**TINY_TOWERS, **towers},
                       objectives={name: _tiny_settings(name, settings)
                                   for name, settings in load_config(preset).model.objectives.items()})


def with_settings(config, name, **settings):
    """`config` with objective `name`'s settings changed."""
    objectives = {**config.objectives, name: dataclasses.replace(config.objectives[name], **settings)}
    return dataclasses.replace(config, objectives=objectives)


def tiny_model(objectives=None, seed=0, **towers):
    torch.manual_seed(seed)
    return MetaArch(tiny_config(objectives, **towers))


def tiny_overrides(preset):
    """`key=value` overrides that shrink the preset's towers and the objectives it enables."""
    return [*(f"model.{key}={value}" for key, value in TINY_TOWERS.items()),
            *enabled_settings_overrides(preset, TINY_SETTINGS)]
