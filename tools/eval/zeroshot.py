"""Zero-shot classification of an image-folder dataset with a run's EMA teachers (CLIP-style prompts).

    python -m tools.eval.zeroshot --run runs/demo --data shards/demo/source/heldout

The dataset is `<data>/<class folder>/*.jpg`; class names come from `<data>/classes.json`
({"classes": [...], "folders": [...]}) when present, else from the folder names ("_" -> " ").
Each class's text embedding is the normalized mean of its prompts' embeddings (the CLIP 7-template
ensemble by default); images are resized and centre-cropped to the model's global crop size.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from datapipe.text import tokenize
from datapipe.views import IMAGENET_MEAN, IMAGENET_STD
from model.harmony import HarmonyConfig
from model.text import TextEncoder
from model.vit import VisionTransformer
from train.pretrain import TEACHER_WEIGHTS

CLIP_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def read_teacher_weights(run_dir):
    path = Path(run_dir) / TEACHER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first (make pretrain), or point --run at a run folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_towers(run_dir, device="cpu"):
    """(image tower, text tower, HarmonyConfig) from a run's teacher weights."""
    weights = read_teacher_weights(run_dir)
    config = HarmonyConfig(**json.loads(weights["model_config"]))
    image = VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px, config.clip_dim)
    image.load_state_dict(weights["image_tower"])
    text = TextEncoder(config.text_width, config.text_layers, config.text_heads, config.clip_dim)
    text.load_state_dict(weights["text_tower"])
    return image.to(device).eval(), text.to(device).eval(), config


def image_folder(data_dir):
    """[(image path, class index)], class names."""
    data_dir = Path(data_dir)
    classes_file = data_dir / "classes.json"
    if classes_file.is_file():
        listing = json.loads(classes_file.read_text())
        names, folders = listing["classes"], listing["folders"]
    else:
        folders = sorted(path.name for path in data_dir.iterdir() if path.is_dir())
        names = [folder.replace("_", " ") for folder in folders]
    samples = [(path, index) for index, folder in enumerate(folders)
               for path in sorted((data_dir / folder).glob("*")) if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not samples:
        raise FileNotFoundError(f"{data_dir}: no images in class folders (<data>/<class>/*.jpg)")
    return samples, names


@torch.no_grad()
def class_embeddings(text_tower, names, templates, device):
    embeddings = []
    for name in names:
        tokens = torch.from_numpy(tokenize([template.format(name) for template in templates])).long().to(device)
        prompts = F.normalize(text_tower(tokens)[0], dim=-1)  # (templates, clip_dim)
        embeddings.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(embeddings)  # (classes, clip_dim)


@torch.no_grad()
def zero_shot(run_dir, data_dir, templates=CLIP_TEMPLATES, batch_size=64, device="cpu"):
    image_tower, text_tower, config = load_towers(run_dir, device)
    samples, names = image_folder(data_dir)
    classifier = class_embeddings(text_tower, names, templates, device)
    preprocess = v2.Compose([v2.Resize(config.global_crop_px, interpolation=v2.InterpolationMode.BICUBIC),
                             v2.CenterCrop(config.global_crop_px), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    correct = torch.zeros(len(names))
    counts = torch.zeros(len(names))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path, _ in chunk]).to(device)
        labels = torch.tensor([label for _, label in chunk])
        predicted = (F.normalize(image_tower.embed_image(images), dim=-1) @ classifier.T).argmax(dim=1).cpu()
        correct.index_add_(0, labels, (predicted == labels).float())
        counts.index_add_(0, labels, torch.ones(len(chunk)))
    per_class = {name: round(float(c / n), 4) for name, c, n in zip(names, correct, counts, strict=True) if n}
    return {"dataset": str(data_dir), "run": str(run_dir), "images": int(counts.sum()), "classes": len(names),
            "top1": round(float(correct.sum() / counts.sum()), 4), "chance": round(1 / len(names), 4),
            "templates": list(templates), "per_class_top1": per_class}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (holding teacher_weights.pt)")
    parser.add_argument("--data", required=True, help="an image folder: <data>/<class>/*.jpg")
    parser.add_argument("--out", help="JSON result (default: <run>/eval_zeroshot.json)")
    args = parser.parse_args(argv)
    try:
        result = zero_shot(args.run, args.data)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    out = Path(args.out or Path(args.run) / "eval_zeroshot.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"zero-shot top-1 on {result['dataset']}: {100 * result['top1']:.1f}% over {result['images']} images "
          f"and {result['classes']} classes (chance {100 * result['chance']:.1f}%); written to {out}")


if __name__ == "__main__":
    main()
