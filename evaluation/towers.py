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
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from datapipe.common import shard_io
from datapipe.load.recipes import IMAGENET_MEAN, IMAGENET_STD
from evaluation import feature_cache
from evaluation.datasets import UndecodableImage, decode_image
from model.meta_arch import ModelConfig
from model.text_tower import TextEncoder
from model.vit import VisionTransformer
from train.config_renames import migrate
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
    config = ModelConfig(**migrate({"model": json.loads(weights["model_config"])})[0]["model"])  # old keys read too
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
    """(3, crop, crop) normalized pixels of a PIL image, an image file or a ShardImage (UndecodableImage when it
    does not decode)."""
    if not isinstance(image, Image.Image):
        image = decode_image(image)
    return preprocess(image.convert("RGB"))


def _decoded_pixels(batch, first_position, undecodable):
    """The pixels of a batch's decode futures that decoded. One that did not is appended to `undecodable` as
    (its position among the images, its name), or raised when `undecodable` is None."""
    pixels = []
    for position, future in enumerate(batch, start=first_position):
        try:
            pixels.append(future.result())
        except UndecodableImage as error:
            if undecodable is None:
                raise
            undecodable.append((position, error.where))
    return pixels


@torch.no_grad()
def iter_image_features(image_tower, images, crop_px, batch_size=64, device="cpu", desc="images", count=None,
                        undecodable=None):
    """Features of `images` (an iterable of PIL images, image files or ShardImages), one dict per batch of
    embedding (b, clip_dim) L2-normalized CLIP embeddings; cls (b, D) CLS tokens; patch_mean (b, D)
    the mean patch token (both after the final norm). Decoding runs on threads, one batch ahead of the tower.
    An image that does not decode stops it (UndecodableImage), or, given a list `undecodable`, is left out and
    appended to it as (its position in `images`, its name)."""
    preprocess, images = eval_transform(crop_px), iter(images)
    decode = functools.partial(_pixels, preprocess=preprocess)
    with ThreadPoolExecutor(DECODE_THREADS) as pool, tqdm(total=count, desc=desc, unit="image", leave=False) as bar:
        pending, position = [pool.submit(decode, image) for image in itertools.islice(images, batch_size)], 0
        while pending:
            batch = pending
            pending = [pool.submit(decode, image) for image in itertools.islice(images, batch_size)]
            decoded = _decoded_pixels(batch, position, undecodable)
            position += len(batch)
            bar.update(len(batch))
            if not decoded:
                continue
            pixels = torch.stack(decoded).to(device)  # (b, 3, crop, crop)
            tokens = image_tower(pixels)  # (b, 1 + N, D)
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
    cached on disk in <run>/features/ (see evaluation.feature_cache). `device`: see eval_device."""

    def __init__(self, run_dir, device="auto"):
        self.run_dir, self.device = Path(run_dir), eval_device(device)
        self.image, self.text, self.config = load_towers(run_dir, self.device)
        self.weights_sha256 = shard_io.sha256_file(self.run_dir / TEACHER_WEIGHTS)
        self._encoded = {}

    def image_features(self, images, desc="images"):
        return image_features(self.image, images, self.config.global_crop_px, device=self.device, desc=desc)

    def iter_image_features(self, images, desc="images", count=None, undecodable=None):
        return iter_image_features(self.image, images, self.config.global_crop_px, device=self.device, desc=desc,
                                   count=count, undecodable=undecodable)

    def encode(self, eval_set):
        """(features {name: (n, dim)}, targets: a class index or the captions of each image) of an EvalSet's
        images that decode (see `undecodable`)."""
        key = eval_set.source.resolve()
        if key not in self._encoded:
            self._encoded[key] = feature_cache.encode(self, eval_set)
        features, targets, _ = self._encoded[key]
        return features, targets

    def undecodable(self, *eval_sets):
        """[{source, images, first}] of the encoded `eval_sets` that had images that do not decode (left out of
        their features): how many, and the first few by name (path, or shard and sample key)."""
        skipped = {str(eval_set.source): self._encoded[eval_set.source.resolve()][2] for eval_set in eval_sets}
        return [{"source": source, **entry} for source, entry in skipped.items() if entry["images"]]


def undecodable_note(entry):
    """One line of an evaluation's output for an `undecodable` entry of RunTowers."""
    more = f", and {entry['images'] - len(entry['first'])} more" if entry["images"] > len(entry["first"]) else ""
    return (f"skipped {entry['images']} image(s) of {entry['source']} that do not decode: "
            f"{', '.join(entry['first'])}{more}")


@torch.no_grad()
def text_embeddings(text_tower, tokens, batch_size=256, device="cpu"):
    """(n, 77) token ids -> (n, clip_dim) L2-normalized CLIP text embeddings."""
    return torch.cat([F.normalize(text_tower(tokens[start:start + batch_size].to(device))[0], dim=-1).cpu()
                      for start in range(0, len(tokens), batch_size)])
