"""Every preset's AdamW groups, gradient clipping and frozen layers against its method's official code.

The official rules are written out here in the official code's own terms (the name tests each codebase applies),
independently of train/parameter_groups.py, and applied to our parameter names."""

import pytest
import torch
from tiny_models import tiny_preset_config

from model.meta_arch import MetaArch
from train.config import load_config, preset_names
from train.parameter_groups import parameter_groups

# base/ presets hold towers, data and optimisation only (no objectives): they do not load alone
PRESETS = sorted(name for name in preset_names() if not name.startswith("base/"))


def harmony_decays(name, param):
    """Harmony's (and iBOT's) get_params_groups: no decay for `.bias` names and 1-D tensors; 0-D tensors decay."""
    return not (name.endswith(".bias") or len(param.shape) == 1)


def open_clip_decays(name, param):
    """open_clip's and SLIP's exclusion (A-CLIP, DetailCLIP, clip-rocket alike): fewer than 2 dimensions, or a name
    holding bn, ln, bias or logit_scale."""
    return not (param.ndim < 2 or any(word in name for word in ("bn", "ln", "bias", "logit_scale")))


# M3AE's no_decay_list (m3ae/model.py), its names mapped onto ours: cls_token; image/text mask embeddings ->
# mask_token; encoder and decoder type embeddings -> modality_embedding; the text embedding table ->
# token_embedding; bias. Its positions are fixed sin-cos, ours learned tables: embeddings, kept out as well.
M3AE_NO_DECAY = {"bias", "cls_token", "mask_token", "modality_embedding", "token_embedding", "pos_embed",
                 "positional_embedding"}


def m3ae_decays(name, param):
    return not any(part in M3AE_NO_DECAY for part in name.split("."))


# Each method's official optimiser set-up; Harmony's code for Harmony and the methods our presets take from it
# (SILC, MaskCLIP and MAE-CLIP: no official code; FLIP: Harmony recipe, and FLIP's own code decays its logit scale).
OPEN_CLIP_METHODS = ("clip", "clip_gap", "clip_max", "clip_map", "slip", "aclip", "detailclip", "clip_rocket",
                     "siamlip", "byolip", "barlip", "swalip", "siglip")


def official_rule(preset):
    method = preset.split("/")[0]  # presets are <method>/<scale>; ablations/ are Harmony's
    if method in ("harmony", "ablations", "mae_clip", "maskclip", "flip"):
        # ablations/harmony_clip is Harmony's CLIP ablation; the others take Harmony's recipe
        return harmony_decays
    if method in OPEN_CLIP_METHODS:
        return open_clip_decays
    return m3ae_decays if method == "m3ae" else harmony_decays


def tiny_model(preset):
    """The preset's model at tiny widths: its objectives, networks and parameter names, each tensor's number of
    dimensions unchanged."""
    model_config = load_config(preset).model
    return MetaArch(tiny_preset_config(preset, clip_pooling=model_config.clip_pooling,
                                       text_layers=min(model_config.text_layers, 2)))


def check_decay(preset, model, rule, decay_rule):
    decayed_group, plain_group = parameter_groups(model, decay_rule)
    decayed = {id(param) for param in decayed_group["params"]}
    plain = {id(param) for param in plain_group["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in decayed | plain, f"{preset}: frozen {name} is in an optimizer group"
        else:
            assert (id(param) in decayed) == rule(name, param), f"{preset}: {name} decayed={id(param) in decayed}"
            assert (id(param) in plain) != (id(param) in decayed)
    if rule is open_clip_decays:
        scalars = [name for name in ("logit_scale", "logit_bias", "rocket_logit_scale") if hasattr(model, name)]
        assert scalars and not any(id(getattr(model, name)) in decayed for name in scalars)


def check_clipping_and_freezing(preset, model, rule, optim):
    """SLIP, A-CLIP, DetailCLIP and clip-rocket train without gradient clipping, M3AE clips at a global norm of 1e9
    (never); Harmony's code clips the image student and the iBOT head per parameter at 3.0 and freezes the iBOT
    head's output layer for the first epoch (and the distillation heads' output norms always: DINO's
    norm_last_layer); A-CLIP freezes the patch embedding. SigLIP takes Harmony's recipe but for its t and b."""
    if rule is not harmony_decays and not preset.startswith("siglip/"):
        assert optim.clip_grad == 0
    else:
        assert optim.clip_grad == 3.0
        clipped = {id(param) for param in model.clipped_parameters()}
        assert clipped == {id(param) for name, param in model.named_parameters()
                           if name.startswith(("image_student.", "ibot_head.")) and param.requires_grad}
    heads = [head for head in ("ibot_head", "text_distillation_head") if hasattr(model, head)]
    assert bool(model.last_layer_parameters()) == ("ibot_head" in heads)
    if "ibot_head" in heads:
        assert optim.freeze_last_layer_epochs == 1
    frozen = sorted(name for name, param in model.named_parameters()
                    if not param.requires_grad and not name.startswith("teachers."))
    expected = [f"{head}.last_layer.parametrizations.weight.original0" for head in heads]
    if preset == "aclip/cc3m":
        expected = ["image_student.patch_embed.proj.bias", "image_student.patch_embed.proj.weight"]
    assert frozen == expected


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_optimises_as_its_methods_official_code(preset):
    """Weight decay for every preset; clipping and freezing for the CC3M recipes (the demo presets keep the demo's
    clipping)."""
    config, model, rule = load_config(preset), tiny_model(preset), official_rule(preset)
    check_decay(preset, model, rule, config.optim.weight_decay_rule)
    if preset.split("/")[1].startswith("cc3m"):  # cc3m, cc3m_vit_s
        check_clipping_and_freezing(preset, model, rule, config.optim)


@pytest.mark.parametrize("rule, logit_scale_decays", [("harmony", True), ("open_clip", False)])
def test_adamw_with_the_groups_decays_the_logit_scale_only_under_harmonys_rule(rule, logit_scale_decays):
    """One AdamW step with zero gradients: decay alone moves a parameter, by lr * weight_decay * value."""
    torch.manual_seed(0)
    model = MetaArch(load_config("clip/demo").model)
    optimizer = torch.optim.AdamW(parameter_groups(model, rule), lr=0.1, weight_decay=0.5)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.5 if group["apply_weight_decay"] else 0.0
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    before = model.logit_scale.item()
    projection = model.image_student.contrastive_projection.detach().clone()
    optimizer.step()
    assert torch.allclose(model.image_student.contrastive_projection, projection * (1 - 0.1 * 0.5))
    assert model.logit_scale.item() == pytest.approx(before * (1 - 0.05) if logit_scale_decays else before)


def test_an_unknown_rule_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"optim.weight_decay_rule='slip'.*harmony, open_clip, m3ae"):
        load_config("clip/demo", ["optim.weight_decay_rule=slip"])
