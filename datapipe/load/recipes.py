"""View recipes: what the loader makes of each sample. Every number is a field with the paper's default.

A recipe is a set of named views. An image view is one or more crops of the image, stacked in the
Batch as (n, B, 3, H, W) under the view's name; each crop has its own size, scale, ratio,
interpolation, flip, colour jitter, grey, blur and solarize, and a view may ask for iBOT masks and
for its crop boxes. A derived view (`EnclosingCrop`, A-CLIP's zoom-out) is computed from the boxes
of another view. A text view is one or more captions per sample, each through a text augmentation
chain (`TextView`), stacked as (n, B, 77) tokens.

`MultiCrop` is Harmony's (iBOT/DINO multi-crop, docs/methods/harmony.md 5.2-5.3): views `global_crops` (2 crops at
224 px, masked) and `local_crops` (8 at 96 px). `SingleCrop` is plain CLIP: view `global_crops`, one
crop. `slip_views`, `clip_rocket_views` and `aclip_views` are docs/methods/README.md section 3's recipes.
"""

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
CAPTION = "caption"  # the text view of a recipe that names none: the shard's tokens, as they are


@dataclass(frozen=True)
class CropAugment:
    """One crop: random resized crop, then per-sample random photometric changes."""

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
    interpolation: str = "bicubic"  # of the resize: "bicubic" or "bilinear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"CropAugment.interpolation={self.interpolation!r}: choose one of {INTERPOLATIONS}")


def plain_crop(size_px, scale, interpolation="bicubic"):
    """A crop with no flip and no colour change."""
    return CropAugment(size_px, scale, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, interpolation=interpolation)


def global_crop(blur_prob, solarize_prob=0.0, size_px=224, scale=(0.32, 1.0)):
    return CropAugment(size_px, scale, blur_prob=blur_prob, solarize_prob=solarize_prob)


@dataclass(frozen=True)
class BlockMasking:
    """iBOT block masks for the global crops (docs/methods/harmony.md 5.3): half the crops unmasked,
    half at U(0.1, 0.5)."""

    pred_ratio: tuple[float, ...] = (0.0, 0.3)  # candidate mean ratios; one is picked per crop
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)  # each candidate is U(mean - var, mean + var)
    min_aspect: float = 0.3  # block aspect ratio in (min_aspect, 1 / min_aspect)
    attempts_per_block: int = 10


@dataclass(frozen=True)
class ImageView:
    """Crops of one sample stacked under one name: (len(crops), B, 3, size, size); all crops one size."""

    crops: tuple[CropAugment, ...]
    masking: BlockMasking | None = None  # iBOT block masks per crop, (n, B, size/patch, size/patch)
    patch_size: int = 16  # the model's, for the mask grid
    boxes: bool = False  # the crops' (top, left, height, width) in source pixels travel with the batch

    def __post_init__(self):
        sizes = {crop.size_px for crop in self.crops}
        if len(sizes) != 1:
            raise ValueError(f"ImageView: its crops have sizes {sorted(sizes)} px; one view stacks crops of one size, "
                             f"so give each size its own view")
        if self.masking is not None and self.size_px % self.patch_size:
            raise ValueError(f"ImageView: size_px={self.size_px} is not a multiple of patch_size={self.patch_size}, "
                             f"so it has no mask grid")

    @property
    def size_px(self):
        return self.crops[0].size_px

    @property
    def mask_grid(self):
        return (self.size_px // self.patch_size,) * 2


@dataclass(frozen=True)
class EnclosingCrop:
    """A-CLIP's zoom-out view: one crop enclosing every crop of view `around`, extended at random towards the
    image borders (top and left uniform between 0 and the enclosed crops', bottom and right between theirs and
    the image's), resized, with no flip and no colour change."""

    around: str
    size_px: int = 224
    interpolation: str = "bilinear"
    boxes: bool = True

    @property
    def crops(self):
        return (plain_crop(self.size_px, (1.0, 1.0), self.interpolation),)

    masking = None


@dataclass(frozen=True)
class TextView:
    """Captions of one sample through the text augmentation chain of CLIP 🚀 (docs/methods/clip_rocket.md): stop words
    removed with `stopword_prob` (kept when nothing would be left), then exactly one EDA operation drawn with
    `eda_weights`. All probabilities 0: the shard's tokens, untouched."""

    captions: int = 1
    stopword_prob: float = 0.0
    eda_weights: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)  # identity, synonym, swap, deletion
    synonyms_replaced: int = 1  # words replaced by a WordNet synonym (EDA's n)
    swaps: int = 1  # pairs of words swapped
    deletion_prob: float = 0.1  # each word deleted with it; one word always stays

    def __post_init__(self):
        if len(self.eda_weights) != 4 or min(self.eda_weights) < 0 or sum(self.eda_weights) <= 0:
            raise ValueError(f"TextView.eda_weights={self.eda_weights}: give 4 weights >= 0 (identity, synonym, swap, "
                             f"deletion), not all 0")

    @property
    def augments(self):
        return self.stopword_prob > 0 or any(self.eda_weights[1:])


WEAK_TEXT = TextView(stopword_prob=0.8)
STRONG_TEXT = TextView(captions=2, stopword_prob=0.8, eda_weights=(0.0, 0.4, 0.4, 0.2))


class NamedViews:
    """What the backends read from a recipe: `image_views` (name -> ImageView or EnclosingCrop, in Batch order),
    `text_views` (name -> TextView), `mean` and `std`."""

    @property
    def crops(self):
        """Every crop of a sample in view order; a crop's place in it keys its random draws."""
        return tuple(crop for view in self.image_views.values() for crop in view.crops)

    @property
    def crop_slices(self):
        """name -> slice of `crops` holding that view's crops."""
        slices, start = {}, 0
        for name, view in self.image_views.items():
            slices[name] = slice(start, start + len(view.crops))
            start += len(view.crops)
        return slices

    def check(self):
        """Raise a one-line error for a recipe no backend can make."""
        names = list(self.image_views)
        for place, (name, view) in enumerate(self.image_views.items()):
            if not isinstance(view, EnclosingCrop):
                continue
            enclosed = self.image_views.get(view.around)
            if not isinstance(enclosed, ImageView) or names.index(view.around) > place:
                raise ValueError(f"view {name!r} encloses view {view.around!r}, which must be an ImageView named "
                                 f"before it (views: {names})")
        for name in self.image_views:
            if name in self.text_views:
                raise ValueError(f"recipe: {name!r} names both an image view and a text view; rename one")


@dataclass(frozen=True)
class ViewRecipe(NamedViews):
    image_views: dict[str, ImageView | EnclosingCrop]
    text_views: dict[str, TextView] = field(default_factory=lambda: {CAPTION: TextView()})
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self.check()


@dataclass(frozen=True)
class MultiCrop(NamedViews):
    global_1: CropAugment = global_crop(blur_prob=1.0)
    global_2: CropAugment = global_crop(blur_prob=0.1, solarize_prob=0.2)
    local: CropAugment = CropAugment(96, (0.05, 0.32), blur_prob=0.5)
    local_crops_number: int = 8
    patch_size: int = 16  # the model's, for the mask grid
    masking: BlockMasking = field(default_factory=BlockMasking)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    text_views = {CAPTION: TextView()}

    def __post_init__(self):
        for name, crop in (("global_1", self.global_1), ("global_2", self.global_2), ("local", self.local)):
            if crop.size_px % self.patch_size:
                raise ValueError(f"MultiCrop.{name}.size_px={crop.size_px} is not a multiple of "
                                 f"patch_size={self.patch_size}")
        if self.global_1.size_px != self.global_2.size_px:
            raise ValueError("MultiCrop: the two global crops must have the same size_px")

    @property
    def image_views(self):
        views = {"global_crops": ImageView((self.global_1, self.global_2), self.masking, self.patch_size)}
        if self.local_crops_number:
            views["local_crops"] = ImageView((self.local,) * self.local_crops_number)
        return views


@dataclass(frozen=True)
class SingleCrop(NamedViews):
    """Plain CLIP: one random resized crop (open_clip's training default), no photometric changes."""

    size_px: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    text_views = {CAPTION: TextView()}

    @property
    def image_views(self):
        crop = CropAugment(self.size_px, self.scale, flip_prob=self.flip_prob, jitter_prob=0.0, grayscale_prob=0.0)
        return {"global_crops": ImageView((crop,))}


def simclr_crop(size_px=224, interpolation="bilinear"):
    """SLIP's SimCLR view (docs/methods/slip.md): RRC 0.08-1, jitter 0.4/0.4/0.4/0.1 at 0.8, grey 0.2, blur at 0.5,
    horizontal flip."""
    return CropAugment(size_px, (0.08, 1.0), saturation=0.4, blur_prob=0.5, interpolation=interpolation)


def slip_views(size_px=224):
    """SLIP: `global_crops`, the CLIP view (RRC 0.5-1, no flip, no colour), and `simclr` (2 SimCLR crops), both
    bilinear; one caption."""
    return ViewRecipe({"global_crops": ImageView((plain_crop(size_px, (0.5, 1.0), "bilinear"),)),
                       "simclr": ImageView((simclr_crop(size_px),) * 2)})


def clip_rocket_views(size_px=224, weak_min_scale=0.5):
    """CLIP 🚀 (docs/methods/clip_rocket.md): `weak` (RRC 0.5-1, no flip, no colour) and `strong` (2 SimCLR-type crops,
    bicubic, solarize 0) images; `weak_text` (stop words removed) and `strong_text` (2 captions, stop words and one EDA
    operation)."""
    return ViewRecipe({"weak": ImageView((plain_crop(size_px, (weak_min_scale, 1.0)),)),
                       "strong": ImageView((simclr_crop(size_px, "bicubic"),) * 2)},
                      {"weak_text": WEAK_TEXT, "strong_text": STRONG_TEXT})


def aclip_views(size_px=224):
    """A-CLIP (docs/methods/aclip.md): `online` (2 crops RRC 0.5-1, bilinear, jitter 0.4/0.4/0.2/0.1 at 0.8, grey 0.2,
    blur 0.1, solarize 0.2, no flip) and `enclosing` (the zoom-out crop around both, no colour), boxes of both."""
    online = CropAugment(size_px, (0.5, 1.0), flip_prob=0.0, blur_prob=0.1, solarize_prob=0.2,
                         interpolation="bilinear")
    return ViewRecipe({"online": ImageView((online,) * 2, boxes=True), "enclosing": EnclosingCrop("online", size_px)})
