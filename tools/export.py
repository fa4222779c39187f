"""Hand a run's weights on: the image tower to timm, image + text towers to open_clip.

    python -m tools.export timm --run runs/demo --out exported/timm
    python -m tools.export open_clip --run runs/demo --out exported/open_clip

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
open_clip: `open_clip_config.json` (open_clip's own ViT and text configs) and
`open_clip_pytorch_model.bin`:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<out>")
    tokenizer = open_clip.get_tokenizer("local-dir:<out>")
"""

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from datapipe.views import IMAGENET_MEAN, IMAGENET_STD
from model.masking import MASK_ID
from model.text import CONTEXT_LENGTH
from model.vit import VIT_SIZES, export_timm_state_dict
from tools.eval.towers import load_towers, read_teacher_weights

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"


def evaluation_preprocessing(config):
    """timm's data config for tools/eval/towers.eval_transform: short side to the crop size, centre crop."""
    return {"input_size": (3, config.global_crop_px, config.global_crop_px), "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"}


def require_cls_pooling(config, target):
    """Both exports pool the CLS token; a run trained with another pooling would embed images wrongly there."""
    if config.clip_pooling != "cls":
        raise ValueError(f"this run's image embedding pools its tokens by {config.clip_pooling!r}; the {target} export "
                         f"carries CLS pooling only, so its image embeddings would be wrong. Evaluate the run with "
                         f"make eval instead (it pools as the run was trained)")


def timm_architecture(config):
    """(registered timm name, keyword arguments that size it as this config's image tower, head = projection)."""
    base_size = config.vit_size if config.vit_size != "micro" else "tiny"
    size = VIT_SIZES[config.vit_size]
    kwargs = dict(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, patch_size=config.patch_size,
                  img_size=config.global_crop_px, global_pool="token", num_classes=config.clip_dim)
    return f"vit_{base_size}_patch16_224", kwargs


def export_timm(run_dir, out_dir):
    """A timm folder (config.json with the preprocessing, model.safetensors); returns it."""
    image, _, config = load_towers(run_dir)
    require_cls_pooling(config, "timm")
    name, kwargs = timm_architecture(config)
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = export_timm_state_dict(image)
    state["head.weight"] = image.contrastive_projection.detach().T.contiguous()  # (clip_dim, D)
    state["head.bias"] = torch.zeros(config.clip_dim)
    model.load_state_dict(state)
    # Our weights, not the registered architecture's: its pretrained tag and licence do not apply.
    provenance = {"pretrained_cfg": {"tag": "harmony_pipe", "license": "unspecified"}}
    save_for_hf(model, out_dir, model_config=provenance, model_args=kwargs,
                data_config=evaluation_preprocessing(config), safe_serialization=True)
    return Path(out_dir)


def open_clip_config(config):
    """open_clip's model config for our towers: its own ViT (no timm trunk), so any size loads."""
    size = VIT_SIZES[config.vit_size]
    model_cfg = {
        "embed_dim": config.clip_dim,
        "quick_gelu": False,  # both towers use GELU (model/text.py)
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


def export_open_clip(run_dir, out_dir):
    image, text, config = load_towers(run_dir)
    require_cls_pooling(config, "open_clip")
    state = open_clip_visual_state(image)
    state.update({name.removeprefix("transformer."): tensor for name, tensor in text.state_dict().items()})
    state["logit_scale"] = read_teacher_weights(run_dir)["logit_scale"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(config), indent=2))
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


if __name__ == "__main__":
    main()
