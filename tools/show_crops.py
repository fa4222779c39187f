"""Write a PNG grid of what the model is fed: each sample's crops, view by view, iBOT masks shaded.

    python -m tools.show_crops --shards shards/demo/train --out runs/crops.png [--recipe aclip]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from datapipe import MultiCrop, SingleCrop, aclip_views, clip_rocket_views, make_loader, slip_views

RECIPES = {"multicrop": MultiCrop, "singlecrop": SingleCrop, "slip": slip_views, "clip_rocket": clip_rocket_views,
           "aclip": aclip_views}


def to_pixels(crop, recipe):
    """(3, H, W) normalized -> (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    return (crop.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def show_crops(shards, out, samples=4, backend="auto", seed=0, recipe=None):
    recipe = recipe or MultiCrop()
    batch = next(iter(make_loader(shards, recipe, samples, backend=backend, seed=seed, num_workers=1)))
    crops = [(name, number) for name, images in batch.images.items() for number in range(images.shape[0])]
    figure, axes = plt.subplots(samples, len(crops), figsize=(1.6 * len(crops), 1.8 * samples), squeeze=False)
    for row in range(samples):
        for column, (name, number) in enumerate(crops):
            axis = axes[row, column]
            image = to_pixels(batch.images[name][number, row], recipe)
            axis.imshow(image)
            if name in batch.masks:
                mask = batch.masks[name][number, row].float().cpu()
                patch = image.shape[0] // mask.shape[0]
                overlay = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
                axis.imshow(overlay, cmap="Reds", alpha=0.45 * overlay, vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"{name} {number + 1}", fontsize=8)
        axes[row, 0].set_ylabel(batch.keys[row], fontsize=7)
    figure.suptitle("crops fed to the model (red: iBOT-masked patches)", fontsize=9)
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    print(f"wrote {out}: {samples} samples x {len(crops)} crops ({backend} backend)")
    return Path(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/demo/train", help="a `make shards` output folder")
    parser.add_argument("--out", default="runs/crops.png")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="multicrop", choices=sorted(RECIPES), help="the views to show")
    args = parser.parse_args()
    show_crops(args.shards, args.out, args.samples, args.backend, args.seed, RECIPES[args.recipe]())


if __name__ == "__main__":
    main()
