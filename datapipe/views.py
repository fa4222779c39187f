"""View recipes: what the loader makes of each image. Every number is a field.

`MultiCrop` defaults are Harmony's (iBOT/DINO multi-crop, HARMONY.md 5.2-5.3): 2 global crops at
224 px and 8 local crops at 96 px, each flipped, colour-jittered, sometimes grey, blurred and
(global crop 2 only) solarized, per sample. `SingleCrop` is plain CLIP training: one crop.
"""

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CropAugment:
    """One crop: random resized crop (bicubic), then per-sample random photometric changes."""

    size_px: int
    scale: tuple[float, float]  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4  # factor drawn from U(1 - b, 1 + b)
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # fraction of the colour circle, U(-h, h)
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px
    solarize_prob: float = 0.0
    solarize_threshold: int = 128  # pixels at or above it are inverted


def global_crop(blur_prob, solarize_prob=0.0, size_px=224, scale=(0.32, 1.0)):
    return CropAugment(size_px, scale, blur_prob=blur_prob, solarize_prob=solarize_prob)


@dataclass(frozen=True)
class BlockMasking:
    """iBOT block masks for the global crops (HARMONY.md 5.3): half the crops unmasked, half at U(0.1, 0.5)."""

    pred_ratio: tuple[float, ...] = (0.0, 0.3)  # candidate mean ratios; one is picked per crop
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)  # each candidate is U(mean - var, mean + var)
    min_aspect: float = 0.3  # block aspect ratio in (min_aspect, 1 / min_aspect)
    attempts_per_block: int = 10


@dataclass(frozen=True)
class MultiCrop:
    global_1: CropAugment = global_crop(blur_prob=1.0)
    global_2: CropAugment = global_crop(blur_prob=0.1, solarize_prob=0.2)
    local: CropAugment = CropAugment(96, (0.05, 0.32), blur_prob=0.5)
    local_crops_number: int = 8
    patch_size: int = 16  # the model's, for the mask grid
    masking: BlockMasking = field(default_factory=BlockMasking)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name, crop in (("global_1", self.global_1), ("global_2", self.global_2), ("local", self.local)):
            if crop.size_px % self.patch_size:
                raise ValueError(f"MultiCrop.{name}.size_px={crop.size_px} is not a multiple of "
                                 f"patch_size={self.patch_size}")
        if self.global_1.size_px != self.global_2.size_px:
            raise ValueError("MultiCrop: the two global crops must have the same size_px")

    @property
    def global_crops(self):
        return (self.global_1, self.global_2)

    @property
    def crops(self):
        """Every crop of a sample, in Batch order: globals, then locals."""
        return self.global_crops + (self.local,) * self.local_crops_number

    @property
    def mask_grid(self):
        return (self.global_1.size_px // self.patch_size,) * 2


@dataclass(frozen=True)
class SingleCrop:
    """Plain CLIP: one random resized crop (open_clip's training default), no photometric changes."""

    size_px: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def global_crops(self):
        return (CropAugment(self.size_px, self.scale, flip_prob=self.flip_prob, jitter_prob=0.0,
                            grayscale_prob=0.0),)

    @property
    def crops(self):
        return self.global_crops

    local_crops_number = 0
    masking = None
