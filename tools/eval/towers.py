"""What every evaluation reads: a run's EMA teacher towers, image folders, and features of images.

`RunTowers` loads a run's towers once and computes each image folder's features once, so `make eval`
encodes a folder that two evaluations read (zero-shot and the probe's test set) a single time.
Images are resized (bicubic) and centre-cropped to the model's global crop size and normalized with
ImageNet statistics, as the official zero-shot and linear evaluations.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from datapipe.views import IMAGENET_MEAN, IMAGENET_STD
from model.meta_arch import ModelConfig
from model.text import TextEncoder
from model.vit import VisionTransformer
from train.pretrain import TEACHER_WEIGHTS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_teacher_weights(run_dir):
    path = Path(run_dir) / TEACHER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first (make pretrain), or point --run at a run folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_towers(run_dir, device="cpu"):
    """(image tower, text tower, ModelConfig) from a run's teacher weights."""
    weights = read_teacher_weights(run_dir)
    config = ModelConfig(**json.loads(weights["model_config"]))
    image = VisionTransformer(config.vit_size, config.patch_size, config.global_crop_px, config.clip_dim,
                              pooling=config.clip_pooling)
    image.load_state_dict(weights["image_tower"])
    text = TextEncoder(config.text_width, config.text_layers, config.text_heads, config.clip_dim)
    text.load_state_dict(weights["text_tower"])
    return image.to(device).eval(), text.to(device).eval(), config


def image_folder(data_dir):
    """([(image path, class index)], class names) of `<data>/<class folder>/*.jpg`.

    Names come from `<data>/classes.json` ({"classes": [...], "folders": [...]}) when present, else from
    the folder names ("_" -> " ")."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: not a folder; expected <data>/<class>/*.jpg")
    classes_file = data_dir / "classes.json"
    if classes_file.is_file():
        listing = json.loads(classes_file.read_text())
        names, folders = listing["classes"], listing["folders"]
    else:
        folders = sorted(path.name for path in data_dir.iterdir() if path.is_dir())
        names = [folder.replace("_", " ") for folder in folders]
    samples = [(path, index) for index, folder in enumerate(folders)
               for path in sorted((data_dir / folder).glob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise FileNotFoundError(f"{data_dir}: no images in class folders (<data>/<class>/*.jpg)")
    return samples, names


def eval_transform(crop_px):
    return v2.Compose([v2.Resize(crop_px, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(crop_px),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def image_features(image_tower, images, crop_px, batch_size=64, device="cpu", desc="images"):
    """Features of `images` (paths or PIL images): dict of
    embedding (n, clip_dim) L2-normalized CLIP embeddings; cls (n, D) CLS tokens; patch_mean (n, D)
    the mean patch token (both after the final norm)."""
    preprocess, parts = eval_transform(crop_px), {"embedding": [], "cls": [], "patch_mean": []}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        chunk = [image if isinstance(image, Image.Image) else Image.open(image)
                 for image in images[start:start + batch_size]]
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in chunk]).to(device)
        tokens = image_tower(pixels)  # (b, 1 + N, D)
        parts["embedding"].append(F.normalize(image_tower.embed_tokens(tokens), dim=-1).cpu())  # the run's pooling
        parts["cls"].append(tokens[:, 0].cpu())
        parts["patch_mean"].append(tokens[:, 1:].mean(dim=1).cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


class RunTowers:
    """A run's EMA teacher towers, loaded once, and the features of each image folder, computed once."""

    def __init__(self, run_dir, device="cpu"):
        self.run_dir, self.device = Path(run_dir), device
        self.image, self.text, self.config = load_towers(run_dir, device)
        self._folders = {}

    def image_features(self, images, desc="images"):
        return image_features(self.image, images, self.config.global_crop_px, device=self.device, desc=desc)

    def folder(self, data_dir):
        """(features as `image_features` gives them, labels (n,), class names) of an image folder."""
        key = Path(data_dir).resolve()
        if key not in self._folders:
            samples, names = image_folder(data_dir)
            features = self.image_features([path for path, _ in samples], desc=f"{Path(data_dir).name} features")
            self._folders[key] = (features, torch.tensor([label for _, label in samples]), names)
        return self._folders[key]


@torch.no_grad()
def text_embeddings(text_tower, tokens, batch_size=256, device="cpu"):
    """(n, 77) token ids -> (n, clip_dim) L2-normalized CLIP text embeddings."""
    return torch.cat([F.normalize(text_tower(tokens[start:start + batch_size].to(device))[0], dim=-1).cpu()
                      for start in range(0, len(tokens), batch_size)])
