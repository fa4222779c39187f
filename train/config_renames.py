"""Configs written before objectives owned their settings, read for one release: their preset names and keys.

Until then `model` held every objective's settings under prefixed names (`model.ibot_cls_weight`) and switched
objectives on and off (`model.mae: false`); now `model.objectives` names the objectives a run trains, each with its
own settings (`model.objectives.ibot.cls_weight`). `migrate` rewrites a config of the old form (a run folder's
config.yaml, a checkpoint's config, a `make compare` plan, an old preset or override) into the new one, so old runs
resume and old commands keep working; the caller prints one line naming what was renamed. Presets moved to one folder
per method (`clip_demo` is `clip/demo`); `PRESET_RENAMES` maps the old names.
"""

OBJECTIVE_SWITCHES = ("ibot", "clip", "mae", "masked_distillation", "multimodal_mae", "detailclip", "simclr", "aclip",
                      "clip_rocket", "siamlip", "byolip", "barlip", "swalip")
# switches that are now a setting of an objective (masked_text is on where either of its switches is)
SETTING_SWITCHES = {"soft_clip": ("clip", "soft_targets"), "mlm": ("masked_text", "mlm"),
                    "text_distillation": ("masked_text", "distillation")}
DISTILLATION = ("ibot", "detailclip")
STUDENT_TEMPERATURES = ("ibot", "masked_text", "masked_distillation", "detailclip")
LOGIT_SCALES = ("clip", "detailclip", "aclip", "clip_rocket")
# old model key -> the (objective, setting) pairs it set: each enabled objective of the config takes the value
SETTINGS = {
    "ibot_out_dim": [(name, "out_dim") for name in DISTILLATION],
    "ibot_head_hidden_dim": [(name, "head_hidden_dim") for name in DISTILLATION],
    "head_bottleneck_dim": [(name, "bottleneck_dim") for name in (*DISTILLATION, "masked_text")],
    "ibot_cls_weight": [(name, "cls_weight") for name in DISTILLATION],
    "ibot_patch_weight": [(name, "patch_weight") for name in DISTILLATION],
    "student_temp": [(name, "student_temp") for name in STUDENT_TEMPERATURES],
    "center_momentum": [(name, "center_momentum") for name in STUDENT_TEMPERATURES],
    "ibot_weight": [("ibot", "weight")],
    "text_distillation_out_dim": [("masked_text", "distillation_out_dim")],
    "text_distillation_head_hidden_dim": [("masked_text", "distillation_head_hidden_dim")],
    "mlm_decoder_depth": [("masked_text", "mlm_decoder_depth")],
    "mlm_decoder_heads": [("masked_text", "mlm_decoder_heads")],
    "mlm_probability": [("masked_text", "mask_probability")],
    "mlm_weight": [("masked_text", "mlm_weight")],
    "text_distillation_weight": [("masked_text", "distillation_weight")],
    "mae_decoder_width": [("mae", "decoder_width")],
    "mae_decoder_depth": [("mae", "decoder_depth")],
    "mae_decoder_heads": [("mae", "decoder_heads")],
    "mae_mask_ratio": [("mae", "mask_ratio")],
    "mae_weight": [("mae", "weight"), ("detailclip", "reconstruction_weight")],
    "clip_weight": [("clip", "weight"), ("detailclip", "clip_weight"), ("aclip", "clip_weight")],
    "clip_loss": [("clip", "loss")],
    "clip_mask_ratio": [("clip", "mask_ratio")],
    "clip_label_smoothing": [("clip", "label_smoothing")],
    "clip_views": [("clip", "views")],
    "soft_clip_temperature": [("clip", "soft_temperature")],
    "logit_bias_init": [("clip", "logit_bias_init")],
    "logit_scale_init": [(name, "logit_scale_init") for name in LOGIT_SCALES],
    "logit_scale_max": [(name, "logit_scale_max") for name in LOGIT_SCALES],
    "masked_distillation_mask_ratio": [("masked_distillation", "mask_ratio")],
    "masked_distillation_decoder_depth": [("masked_distillation", "decoder_depth")],
    "masked_distillation_decoder_heads": [("masked_distillation", "decoder_heads")],
    "masked_distillation_weight": [("masked_distillation", "weight")],
    "multimodal_image_mask_ratio": [("multimodal_mae", "image_mask_ratio")],
    "multimodal_text_mask_ratio": [("multimodal_mae", "text_mask_ratio")],
    "multimodal_norm_pix": [("multimodal_mae", "norm_pix")],
    "multimodal_decoder_width": [("multimodal_mae", "decoder_width")],
    "multimodal_decoder_depth": [("multimodal_mae", "decoder_depth")],
    "multimodal_decoder_heads": [("multimodal_mae", "decoder_heads")],
    "multimodal_image_weight": [("multimodal_mae", "image_weight")],
    "multimodal_text_weight": [("multimodal_mae", "text_weight")],
    "detail_mask_ratio": [("detailclip", "mask_ratio")],
    "detail_decoder_depth": [("detailclip", "decoder_depth")],
    "detail_decoder_heads": [("detailclip", "decoder_heads")],
    "simclr_hidden_dim": [("simclr", "hidden_dim"), ("aclip", "simclr_hidden_dim")],
    "simclr_out_dim": [("simclr", "out_dim"), ("aclip", "simclr_out_dim")],
    "simclr_temperature": [("simclr", "temperature"), ("aclip", "simclr_temperature")],
    "simclr_weight": [("simclr", "weight"), ("aclip", "simclr_weight")],
    "aclip_mask_ratio": [("aclip", "mask_ratio")],
    "aclip_freeze_patch_embed": [("aclip", "freeze_patch_embed")],
    "byol_hidden_dim": [("aclip", "byol_hidden_dim")],
    "byol_out_dim": [("aclip", "byol_out_dim")],
    "byol_weight": [("aclip", "byol_weight")],
    "rocket_hidden_dim": [("clip_rocket", "hidden_dim")],
    "rocket_dim": [("clip_rocket", "dim")],
    "rocket_logit_scale_init": [("clip_rocket", "local_logit_scale_init")],
    "rocket_label_smoothing": [("clip_rocket", "label_smoothing")],
    "rocket_text_dropout": [("clip_rocket", "text_dropout")],
    "rocket_loss_mode": [("clip_rocket", "loss_mode")],
    "siam_hidden_dim": [("siamlip", "hidden_dim"), ("byolip", "hidden_dim")],
    "siam_dim": [("siamlip", "dim"), ("byolip", "dim")],
    "barlip_hidden_dim": [("barlip", "hidden_dim")],
    "barlip_dim": [("barlip", "dim")],
    "barlip_scale": [("barlip", "scale")],
    "barlip_lambda": [("barlip", "off_diagonal_weight")],
    "swalip_weight": [("swalip", "weight")],
    "swalip_epsilon": [("swalip", "epsilon")],
    "swalip_iterations": [("swalip", "iterations")],
}
OLD_KEYS = {*OBJECTIVE_SWITCHES, *SETTING_SWITCHES, *SETTINGS}

METHOD_SCALES = ("demo", "cc3m")
RENAMED_METHODS = ("aclip", "barlip", "byolip", "clip", "clip_gap", "clip_map", "clip_max", "clip_rocket",
                   "detailclip", "flip", "m3ae", "mae_clip", "maskclip", "siamlip", "siglip", "silc", "slip", "swalip",
                   "harmony")
PRESET_RENAMES = {
    **{f"{method}_{scale}": f"{method}/{scale}" for method in RENAMED_METHODS for scale in METHOD_SCALES},
    "demo": "harmony/demo", "vit_b_cc3m": "harmony/cc3m", "vit_s_cc3m": "harmony/cc3m_vit_s",
    "vit_b_cc12m": "harmony/cc12m", "clip": "ablations/harmony_clip", "ablation_clip_text": "ablations/clip_text",
    "ablation_clip_ibot": "ablations/clip_ibot", "ablation_clip_ibot_soft": "ablations/clip_ibot_soft",
    "ablation_clip_ibot_soft_mae": "ablations/clip_ibot_soft_mae",
}


def _objective_switches(objectives, old):
    """Apply the old on/off switches to `objectives` (name -> settings dict, or False)."""
    for name in OBJECTIVE_SWITCHES:
        if name in old:
            enabled = isinstance(objectives.get(name), dict)
            objectives[name] = (objectives[name] if enabled else {}) if old[name] else False
    text_switches = {SETTING_SWITCHES[key][1]: old[key] for key in ("mlm", "text_distillation") if key in old}
    if text_switches:
        text = objectives.get("masked_text")
        text = {**text, **text_switches} if isinstance(text, dict) else {"mlm": False, "distillation": False,
                                                                          **text_switches}
        objectives["masked_text"] = text if text.get("mlm", True) or text.get("distillation", True) else False
    if "soft_clip" in old:
        if isinstance(objectives.get("clip"), dict):
            objectives["clip"]["soft_targets"] = old["soft_clip"]
        elif old["soft_clip"]:
            raise ValueError("model.soft_clip (now model.objectives.clip.soft_targets) needs clip: set clip=true or "
                             "soft_clip=false")


def migrate(values):
    """(values in the new form, the old keys it renamed) of a nested config dict; values already in the new form
    come back as they are. Settings of objectives the config does not enable are dropped (they did nothing)."""
    model = values.get("model")
    if not isinstance(model, dict) or not OLD_KEYS & set(model):
        return values, []
    model = dict(model)
    old = {key: model.pop(key) for key in list(model) if key in OLD_KEYS}
    objectives = {name: dict(settings) if isinstance(settings, dict) else settings
                  for name, settings in (model.get("objectives") or {}).items()}
    _objective_switches(objectives, old)
    for key, targets in SETTINGS.items():
        if key in old:
            for name, setting in targets:
                if isinstance(objectives.get(name), dict):
                    objectives[name][setting] = old[key]
    model["objectives"] = objectives
    return {**values, "model": model}, sorted(f"model.{key}" for key in old)


def renamed_line(renamed, preset=None):
    """The one line that says what an old config was read as, or "" when nothing was renamed."""
    parts = []
    if preset:
        parts.append(f"preset {preset[0]} is now {preset[1]}")
    if renamed:
        parts.append(f"{', '.join(renamed[:4])}{f' and {len(renamed) - 4} more' if len(renamed) > 4 else ''} "
                     f"are now under model.objectives (docs/config.md lists the new names)")
    return f"config notice: {'; '.join(parts)}; the old names work for one more release" if parts else ""
