"""Train an open_clip model on harmony-pipe shards: the data pipeline as a library, unchanged.

    python -m examples.train_open_clip --shards shards/demo/train --steps 200

The loader gives `Batch`es; a SingleCrop batch holds one crop per image (`global_crops[0]`) and
the caption tokens, which is all CLIP needs. The default model is a tiny open_clip config
(examples/open_clip_tiny/) that trains on CPU in seconds; use any open_clip model name instead
(e.g. "ViT-B-32").
"""

import argparse
from pathlib import Path

import open_clip
import torch

from datapipe import SingleCrop, make_loader

TINY_CLIP = f"local-dir:{Path(__file__).parent / 'open_clip_tiny'}"  # open_clip_config.json, no weights


def train(shards, steps=100, batch_size=32, model_name=None, lr=1e-3, backend="auto", device="cpu", seed=0):
    """Returns the loss of every step."""
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name or TINY_CLIP, device=device)
    image_px = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    loader = make_loader(shards, SingleCrop(size_px=image_px), batch_size, backend=backend, device=device, seed=seed)
    clip_loss = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses, epoch = [], 0
    while len(losses) < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            image_features, text_features, logit_scale = model(batch.global_crops[0], batch.tokens)
            loss = clip_loss(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/demo/train")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="an open_clip model name; default: a tiny CPU config")
    args = parser.parse_args()
    losses = train(args.shards, args.steps, args.batch_size, args.model)
    print(f"trained {len(losses)} steps: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
          f"(mean of the last 10)")


if __name__ == "__main__":
    main()
