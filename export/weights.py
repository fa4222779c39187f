"""Hand a run's weights on: the image tower to timm, image + text towers to open_clip.

    python -m export timm --run runs/harmony_demo --out exported/timm
    python -m export open_clip --run runs/harmony_demo --out exported/open_clip

Both read `runs/<run>/teacher_weights.pt` (the EMA teachers) and work for every ViT size, patch
and crop size we train, and both carry the evaluation preprocessing (resize the short side to the
global crop size with bicubic, centre crop, ImageNet mean/std), so the libraries' own transforms
reproduce ours.

timm: timm's own folder format (`config.json` + `model.safetensors`), written by timm's
`save_for_hf`. The CLIP projection is the classifier head (bias zero), so the model's output is the
CLIP image embedding:
    model = timm.create_model("local-dir:<out>", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    embedding = model(transform(image)[None])          # num_classes=0 gives the CLS token instead
A run that trained no contrastive loss (M3AE) has no CLIP projection worth the name: its timm model has no
head (the output is the CLS token), and its open_clip export is refused.
open_clip: `open_clip_config.json` (open_clip's own ViT and text configs, with the run's logit scale, and
SigLIP's logit bias, as `init_logit_scale` / `init_logit_bias`) and `open_clip_pytorch_model.bin` (both towers,
`logit_scale`, and `logit_bias` for SigLIP), so `model.get_logits(images, texts)` gives the run's logits:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<out>")
    tokenizer = open_clip.get_tokenizer("local-dir:<out>")
"""

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from datapipe.load.recipes import IMAGENET_MEAN, IMAGENET_STD
from evaluation.towers import load_towers, read_teacher_weights
from model.masking import MASK_ID
from model.text_tower import CONTEXT_LENGTH
from model.vit import VIT_SIZES, export_timm_state_dict
from train import checkpoint
from train.checkpoint import CheckpointError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
CONTRASTIVE_OBJECTIVES = ("clip", "aclip", "detailclip", "clip_rocket")  # those that train the CLIP projections


def evaluation_preprocessing(config):
    """timm's data config for evaluation/towers.eval_transform: short side to the crop size, centre crop."""
    return {"input_size": (3, config.global_crop_px, config.global_crop_px), "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"}


def require_cls_pooling(config, target):
    """Both exports pool the CLS token; a run trained with another pooling would embed images wrongly there."""
    if config.clip_pooling != "cls":
        raise ValueError(f"this run's image embedding pools its tokens by {config.clip_pooling!r}; the {target} export "
                         f"carries CLS pooling only, so its image embeddings would be wrong. Evaluate the run with "
                         f"make eval instead (it pools as the run was trained)")


def trains_clip_projection(config):
    """Whether some objective of the run trained its CLIP projections and logit scale (a contrastive loss)."""
    return any(name in config.objectives for name in CONTRASTIVE_OBJECTIVES)


def require_contrastive_loss(config):
    """open_clip's model is the two towers' CLIP projections and logit scale: a run without a contrastive loss
    (M3AE) never trained them, so its open_clip model would score every image-text pair at random."""
    if not trains_clip_projection(config):
        raise ValueError(f"this run trained no contrastive loss (its objectives: {', '.join(config.objectives)}), so "
                         f"its CLIP projections and logit scale are untrained and an open_clip model of it would score "
                         f"images against texts at random; export its image tower with `python -m export timm` "
                         f"instead (its output is the CLS token)")


def timm_architecture(config):
    """(registered timm name, keyword arguments that size it as this config's image tower, head = projection where
    a contrastive loss trained one, else no head)."""
    base_size = config.vit_size if config.vit_size != "micro" else "tiny"
    size = VIT_SIZES[config.vit_size]
    kwargs = dict(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, patch_size=config.patch_size,
                  img_size=config.global_crop_px, global_pool="token",
                  num_classes=config.clip_dim if trains_clip_projection(config) else 0)
    return f"vit_{base_size}_patch16_224", kwargs


def export_timm(run_dir, out_dir, report=print):
    """A timm folder (config.json with the preprocessing, model.safetensors); returns it. A run without a contrastive
    loss gets no head, which `report` says."""
    image, _, config = load_towers(run_dir)
    require_cls_pooling(config, "timm")
    name, kwargs = timm_architecture(config)
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = export_timm_state_dict(image)
    if kwargs["num_classes"]:
        state["head.weight"] = image.contrastive_projection.detach().T.contiguous()  # (clip_dim, D)
        state["head.bias"] = torch.zeros(config.clip_dim)
    else:
        report(f"note: {run_dir} trained no contrastive loss, so its CLIP projection is untrained and left out: the "
               f"exported model's output is the CLS token")
    model.load_state_dict(state)
    # Our weights, not the registered architecture's: its pretrained tag and licence do not apply.
    provenance = {"pretrained_cfg": {"tag": "harmony_pipe", "license": "unspecified"}}
    save_for_hf(model, out_dir, model_config=provenance, model_args=kwargs,
                data_config=evaluation_preprocessing(config), safe_serialization=True)
    return Path(out_dir)


def open_clip_config(config, logits):
    """open_clip's model config for our towers: its own ViT (no timm trunk), so any size loads; `logits` (see
    logit_parameters) set init_logit_scale and, for SigLIP, init_logit_bias, without which open_clip's model has no
    logit_bias parameter."""
    size = VIT_SIZES[config.vit_size]
    model_cfg = {
        "embed_dim": config.clip_dim,
        "quick_gelu": False,  # both towers use GELU (model/text_tower.py)
        **{f"init_{name}": float(value) for name, value in logits.items()},
        "vision_cfg": {"image_size": config.global_crop_px, "patch_size": config.patch_size, "width": size.embed_dim,
                       "layers": size.depth, "head_width": size.embed_dim // size.num_heads, "mlp_ratio": 4.0,
                       "no_ln_pre": True, "pool_type": "tok", "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": MASK_ID + 1, "width": config.text_width,
                     "heads": config.text_heads, "layers": config.text_layers},
    }
    preprocess_cfg = {"size": config.global_crop_px, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


TIMM_TO_OPEN_CLIP_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight",
                           "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "norm2": "ln_2",
                           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_visual_state(image):
    """Our ViT's weights under open_clip's VisionTransformer names (prefix `visual.`)."""
    state = image.state_dict()
    # open_clip's patch convolution has no bias: a constant added to every patch token, so it moves
    # into the patch positions' embeddings, which are added right after the convolution.
    positions = state["pos_embed"][0].clone()  # (1 + N, D), CLS first
    positions[1:] += state["patch_embed.proj.bias"]
    visual = {"conv1.weight": state["patch_embed.proj.weight"], "class_embedding": state["cls_token"][0, 0],
              "positional_embedding": positions, "ln_post.weight": state["norm.weight"],
              "ln_post.bias": state["norm.bias"], "proj": state["contrastive_projection"]}  # proj: (D, clip_dim)
    for name, tensor in state.items():
        if name.startswith("blocks."):
            _, number, rest = name.split(".", 2)
            for ours, theirs in TIMM_TO_OPEN_CLIP_BLOCK.items():
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours):]
                    break
            visual[f"transformer.resblocks.{number}.{rest}"] = tensor
    return {f"visual.{name}": tensor for name, tensor in visual.items()}


def saved_logit_bias(run_dir):
    """SigLIP's logit bias from the run's newest loadable checkpoint, for a teacher_weights.pt written before it
    held the bias."""
    try:
        _, state = checkpoint.latest_good(run_dir, report=lambda _: None)
    except CheckpointError:
        state = None
    if state is None or "logit_bias" not in state["model"]:
        raise ValueError(f"{Path(run_dir)}/teacher_weights.pt has no logit bias (it predates this export) and no "
                         f"checkpoint in {Path(run_dir)}/checkpoints holds one: without it this SigLIP model's sigmoid "
                         f"probabilities would be wrong. Export from the run folder that still has its checkpoints")
    return state["model"]["logit_bias"]


def logit_parameters(run_dir, config):
    """{"logit_scale": ..., and "logit_bias" for SigLIP}: what open_clip applies to the cosine similarities."""
    weights = read_teacher_weights(run_dir)
    logits = {"logit_scale": weights["logit_scale"]}
    if "clip" in config.objectives and config.objectives["clip"].loss == "sigmoid":
        logits["logit_bias"] = weights["logit_bias"] if "logit_bias" in weights else saved_logit_bias(run_dir)
    return logits


def export_open_clip(run_dir, out_dir):
    """An open_clip folder (open_clip_config.json with the preprocessing, open_clip_pytorch_model.bin); returns it."""
    image, text, config = load_towers(run_dir)
    require_cls_pooling(config, "open_clip")
    require_contrastive_loss(config)
    logits = logit_parameters(run_dir, config)
    state = open_clip_visual_state(image)
    state.update({name.removeprefix("transformer."): tensor for name, tensor in text.state_dict().items()})
    state.update(logits)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(config, logits), indent=2))
    torch.save(state, out_dir / OPEN_CLIP_WEIGHTS)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["timm", "open_clip"])
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.target == "timm":
            out = export_timm(args.run, args.out)
            print(f"wrote {out}; load with timm.create_model('local-dir:{out}', pretrained=True) and its "
                  f"transform with timm.data.create_transform(**timm.data.resolve_data_config(model=model))")
        else:
            out = export_open_clip(args.run, args.out)
            print(f"wrote {out}; load with open_clip.create_model_and_transforms('local-dir:{out}') and "
                  f"open_clip.get_tokenizer('local-dir:{out}')")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
