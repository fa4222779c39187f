"""What every evaluation reads: a run's EMA teacher towers and the features of evaluation images.

`RunTowers` loads a run's towers once and encodes each evaluation set once (cached on disk), so `make eval`
encodes a folder that two evaluations read (zero-shot and the probe's test set) a single time.
Images are resized (bicubic) and centre-cropped to the model's global crop size and normalized with
ImageNet statistics, as the official zero-shot and linear evaluations.
"""

import functools
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from tqdm import tqdm

from datapipe import shard_io
from datapipe.views import IMAGENET_MEAN, IMAGENET_STD
from model.meta_arch import ModelConfig
from model.text import TextEncoder
from model.vit import VisionTransformer
from tools.eval import feature_cache
from tools.eval.datasets import ShardImage, open_image
from train.pretrain import TEACHER_WEIGHTS

FEATURE_NAMES = ("embedding", "cls", "patch_mean")
DECODE_THREADS = 4


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


def eval_transform(crop_px):
    return v2.Compose([v2.Resize(crop_px, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(crop_px),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _pixels(image, preprocess):
    """(3, crop, crop) normalized pixels of a PIL image, an image file or a ShardImage."""
    if not isinstance(image, Image.Image):
        try:
            image = open_image(image)
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{image.where if isinstance(image, ShardImage) else image}: the image does not decode "
                             f"({error}); run `make verify` on shards, or remove the file") from None
    return preprocess(image.convert("RGB"))


@torch.no_grad()
def iter_image_features(image_tower, images, crop_px, batch_size=64, device="cpu", desc="images", count=None):
    """Features of `images` (an iterable of PIL images, image files or ShardImages), one dict per batch of
    embedding (b, clip_dim) L2-normalized CLIP embeddings; cls (b, D) CLS tokens; patch_mean (b, D)
    the mean patch token (both after the final norm). Decoding runs on threads, one batch ahead of the tower."""
    preprocess, images = eval_transform(crop_px), iter(images)
    decode = functools.partial(_pixels, preprocess=preprocess)
    with ThreadPoolExecutor(DECODE_THREADS) as pool, tqdm(total=count, desc=desc, unit="image", leave=False) as bar:
        pending = [pool.submit(decode, image) for image in itertools.islice(images, batch_size)]
        while pending:
            batch = pending
            pending = [pool.submit(decode, image) for image in itertools.islice(images, batch_size)]
            pixels = torch.stack([future.result() for future in batch]).to(device)  # (b, 3, crop, crop)
            tokens = image_tower(pixels)  # (b, 1 + N, D)
            bar.update(len(batch))
            yield {"embedding": F.normalize(image_tower.embed_tokens(tokens), dim=-1).cpu(),  # the run's pooling
                   "cls": tokens[:, 0].cpu(), "patch_mean": tokens[:, 1:].mean(dim=1).cpu()}


def image_features(image_tower, images, crop_px, batch_size=64, device="cpu", desc="images"):
    """`iter_image_features` of a list of images, concatenated: {name: (n, dim)}."""
    batches = list(iter_image_features(image_tower, images, crop_px, batch_size, device, desc, len(images)))
    return {name: torch.cat([batch[name] for batch in batches]) for name in FEATURE_NAMES}


def eval_device(choice="auto"):
    """The torch device evaluations run on: auto = the first CUDA device when there is one, else the CPU."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: this machine has no CUDA device; use --device cpu (or auto)")
    return choice


class RunTowers:
    """A run's EMA teacher towers, loaded once, and the features of each evaluation set, computed once and
    cached on disk in <run>/features/ (see tools.eval.feature_cache). `device`: see eval_device."""

    def __init__(self, run_dir, device="auto"):
        self.run_dir, self.device = Path(run_dir), eval_device(device)
        self.image, self.text, self.config = load_towers(run_dir, self.device)
        self.weights_sha256 = shard_io.sha256_file(self.run_dir / TEACHER_WEIGHTS)
        self._encoded = {}

    def image_features(self, images, desc="images"):
        return image_features(self.image, images, self.config.global_crop_px, device=self.device, desc=desc)

    def iter_image_features(self, images, desc="images", count=None):
        return iter_image_features(self.image, images, self.config.global_crop_px, device=self.device, desc=desc,
                                   count=count)

    def encode(self, eval_set):
        """(features {name: (n, dim)}, targets: a class index or the captions of each image) of an EvalSet."""
        key = eval_set.source.resolve()
        if key not in self._encoded:
            self._encoded[key] = feature_cache.encode(self, eval_set)
        return self._encoded[key]


@torch.no_grad()
def text_embeddings(text_tower, tokens, batch_size=256, device="cpu"):
    """(n, 77) token ids -> (n, clip_dim) L2-normalized CLIP text embeddings."""
    return torch.cat([F.normalize(text_tower(tokens[start:start + batch_size].to(device))[0], dim=-1).cpu()
                      for start in range(0, len(tokens), batch_size)])
