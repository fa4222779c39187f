"""AdamW's two parameter groups: the parameters weight decay applies to and those it leaves alone, by the rule of the
method's official training code (`optim.weight_decay_rule`).

The rule belongs to a method's optimiser set-up, not to one of its losses: Harmony's code and SLIP's decay the same
CLIP logit scale differently. Each preset names its method's rule:
- harmony: biases and 1-D tensors (norm weights) are not decayed; every other tensor is, the 0-D logit scale and
  SigLIP's bias included (Harmony's code, as iBOT's and DINO's). FLIP's code decays its logit scale too.
- open_clip: biases and every tensor of fewer than 2 dimensions (norm weights, logit scales, SigLIP's bias) are not
  decayed (open_clip, SLIP, A-CLIP, DetailCLIP, CLIP 🚀; big_vision's SigLIP decays only weight matrices).
  Under decay the logit scale settles where its gradient balances the decay (about exp(1 / 0.5) = 7.4 at weight
  decay 0.5) instead of reaching 100: a weaker CLIP than these methods train.
- m3ae: biases, embedding tables and learned tokens (class, mask, position, modality) are not decayed; everything
  else is, norm weights included (M3AE's code: its list of names kept out of decay).
"""

from torch import nn

WEIGHT_DECAY_RULES = ("harmony", "open_clip", "m3ae")


def _is_embedding(module, name):
    """A table or token an embedding layer or a module holds directly: cls_token, mask_token, pos_embed,
    positional_embedding, modality_embedding, token_embedding.weight."""
    return isinstance(module, nn.Embedding) or name.endswith(("token", "embed", "embedding"))


def decays(rule, module, name, param):
    """Whether weight decay applies to `param`, held by `module` under the (unqualified) `name`."""
    if name == "bias":
        return False
    if rule == "harmony":
        return param.ndim != 1
    if rule == "open_clip":
        return param.ndim >= 2
    if rule == "m3ae":
        return not _is_embedding(module, name)
    raise ValueError(f"optim.weight_decay_rule={rule!r} is not one of {WEIGHT_DECAY_RULES}")


def parameter_groups(model, rule="harmony"):
    """[decayed group, group without decay] for torch.optim.AdamW; the trainer sets the decayed group's weight
    decay each step (`apply_weight_decay`). Frozen parameters (requires_grad False) are in neither."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (decay if decays(rule, module, name, param) else no_decay).append(param)
    return [{"params": decay, "apply_weight_decay": True},
            {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0}]
