"""Hand a run's weights on: the image tower to timm, image + text towers to open_clip.

    python -m tools.export timm --run runs/demo --out exported/timm
    python -m tools.export open_clip --run runs/demo --out exported/open_clip

Both read `runs/<run>/teacher_weights.pt` (the EMA teachers). timm: a state dict plus
`timm_model.json` naming the timm architecture and the keyword arguments that size it; load with
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=<out>/model.pth, num_classes=0),
                      **kwargs)
open_clip: `open_clip_config.json` and `open_clip_pytorch_model.bin`; load with
    open_clip.create_model_and_transforms("local-dir:<out>")
The open_clip image tower is a timm trunk, so it needs a timm-registered ViT (tiny/small/base/large,
patch 16, 224 px).
"""

import argparse
import json
from pathlib import Path

import torch

from datapipe.views import IMAGENET_MEAN, IMAGENET_STD
from model.masking import MASK_ID
from model.text import CONTEXT_LENGTH
from model.vit import VIT_SIZES, export_timm_state_dict
from tools.eval.towers import load_towers, read_teacher_weights


def timm_architecture(config):
    """(registered timm name, keyword arguments that resize it to this config)."""
    base_size = config.vit_size if config.vit_size != "micro" else "tiny"
    name = f"vit_{base_size}_patch16_224"
    size = VIT_SIZES[config.vit_size]
    kwargs = {}
    if config.vit_size == "micro":
        kwargs.update(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads)
    if config.patch_size != 16 or config.global_crop_px != 224:
        kwargs.update(patch_size=config.patch_size, img_size=config.global_crop_px)
    return name, kwargs


def export_timm(run_dir, out_dir):
    image, _, config = load_towers(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(export_timm_state_dict(image), out_dir / "model.pth")
    name, kwargs = timm_architecture(config)
    (out_dir / "timm_model.json").write_text(json.dumps({"model_name": name, "kwargs": kwargs}, indent=2))
    return out_dir / "model.pth", name, kwargs


def open_clip_config(config):
    name, kwargs = timm_architecture(config)
    if kwargs:
        raise ValueError(f"open_clip builds its image tower from a registered timm name; a {config.vit_size} ViT "
                         f"with patch {config.patch_size} at {config.global_crop_px} px is not one. Export to timm "
                         f"instead, or train vit_size tiny/small/base/large with patch 16 at 224 px.")
    model_cfg = {
        "embed_dim": config.clip_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": config.global_crop_px, "timm_model_name": name, "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": MASK_ID + 1, "width": config.text_width,
                     "heads": config.text_heads, "layers": config.text_layers},
    }
    preprocess_cfg = {"size": config.global_crop_px, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def export_open_clip(run_dir, out_dir):
    image, text, config = load_towers(run_dir)
    open_clip_json = open_clip_config(config)
    state = {f"visual.trunk.{name}": tensor for name, tensor in export_timm_state_dict(image).items()}
    state["visual.head.proj.weight"] = image.contrastive_projection.detach().T.contiguous()  # (clip_dim, D)
    state.update({name.removeprefix("transformer."): tensor for name, tensor in text.state_dict().items()})
    state["logit_scale"] = read_teacher_weights(run_dir)["logit_scale"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(json.dumps(open_clip_json, indent=2))
    torch.save(state, out_dir / "open_clip_pytorch_model.bin")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["timm", "open_clip"])
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.target == "timm":
            path, name, kwargs = export_timm(args.run, args.out)
            print(f"wrote {path}; load with timm.create_model({name!r}, pretrained=True, "
                  f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes=0), **{kwargs})")
        else:
            out = export_open_clip(args.run, args.out)
            print(f"wrote {out}; load with open_clip.create_model_and_transforms('local-dir:{out}')")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
