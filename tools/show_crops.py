"""Write a PNG grid of what the model is fed: each sample's crops, iBOT masks shaded on the globals.

    python -m tools.show_crops --shards shards/demo/train --out runs/crops.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from datapipe import MultiCrop, make_loader


def to_pixels(crop, recipe):
    """(3, H, W) normalized -> (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(recipe.mean)[:, None, None], torch.tensor(recipe.std)[:, None, None]
    return (crop.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def show_crops(shards, out, samples=4, backend="auto", seed=0, recipe=None):
    recipe = recipe or MultiCrop()
    batch = next(iter(make_loader(shards, recipe, samples, backend=backend, seed=seed, num_workers=1)))
    crops = list(batch.global_crops) + list(batch.local_crops)  # each (B, 3, H, W); sizes differ
    figure, axes = plt.subplots(samples, len(crops), figsize=(1.6 * len(crops), 1.8 * samples), squeeze=False)
    for row in range(samples):
        for column in range(len(crops)):
            axis = axes[row, column]
            image = to_pixels(crops[column][row], recipe)
            axis.imshow(image)
            if column < batch.ibot_masks.shape[0]:
                mask = batch.ibot_masks[column, row].float().cpu()
                patch = image.shape[0] // mask.shape[0]
                overlay = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
                axis.imshow(overlay, cmap="Reds", alpha=0.45 * overlay, vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("global %d" % (column + 1) if column < 2 else "local %d" % (column - 1), fontsize=8)
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
    args = parser.parse_args()
    show_crops(args.shards, args.out, args.samples, args.backend, args.seed)


if __name__ == "__main__":
    main()
