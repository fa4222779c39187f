"""Zero-shot classification of an image-folder dataset with a run's EMA teachers (CLIP-style prompts).

    python -m tools.eval.zeroshot --run runs/demo --data shards/demo/source/heldout

The dataset is `<data>/<class folder>/*.jpg` (see tools.eval.towers.image_folder for class names).
Each class's text embedding is the normalized mean of its prompts' embeddings (the CLIP 7-template
ensemble by default).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from datapipe.text import tokenize
from tools.eval.towers import RunTowers, text_embeddings

CLIP_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


@torch.no_grad()
def class_embeddings(text_tower, names, templates, device="cpu"):
    """(classes, clip_dim): per class, the normalized mean of its normalized prompt embeddings."""
    tokens = torch.from_numpy(tokenize([template.format(name) for name in names for template in templates])).long()
    prompts = text_embeddings(text_tower, tokens, device=device).unflatten(0, (len(names), len(templates)))
    return F.normalize(prompts.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot(towers, data_dir, templates=CLIP_TEMPLATES):
    """Top-1 (overall and per class) of `towers` (a RunTowers) on an image folder."""
    features, labels, names = towers.folder(data_dir)
    classifier = class_embeddings(towers.text, names, templates, towers.device)
    hits = ((features["embedding"] @ classifier.T).argmax(dim=1) == labels).float()
    correct = torch.zeros(len(names)).index_add_(0, labels, hits)
    counts = torch.zeros(len(names)).index_add_(0, labels, torch.ones(len(labels)))
    per_class = {name: round(float(c / n), 4) for name, c, n in zip(names, correct, counts, strict=True) if n}
    return {"dataset": str(data_dir), "run": str(towers.run_dir), "images": len(labels), "classes": len(names),
            "top1": round(float(hits.mean()), 4), "chance": round(1 / len(names), 4),
            "templates": list(templates), "per_class_top1": per_class}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--data", required=True, help="an image folder: <data>/<class>/*.jpg")
    parser.add_argument("--out", help="JSON result (default: <run>/eval_zeroshot.json)")
    args = parser.parse_args(argv)
    try:
        result = zero_shot(RunTowers(args.run), args.data)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    out = Path(args.out or Path(args.run) / "eval_zeroshot.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"zero-shot top-1 on {result['dataset']}: {100 * result['top1']:.1f}% over {result['images']} images "
          f"and {result['classes']} classes (chance {100 * result['chance']:.1f}%); written to {out}")


if __name__ == "__main__":
    main()
