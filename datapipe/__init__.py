"""harmony-pipe's data pipeline: url list -> WebDataset shards -> training batches.

    from datapipe import make_loader, MultiCrop, SingleCrop
    loader = make_loader("shards/demo/train", SingleCrop(), batch_size=256)
"""

from datapipe.load.batch import Batch
from datapipe.load.loader import make_loader
from datapipe.load.recipes import (
    BlockMasking,
    CropAugment,
    EnclosingCrop,
    ImageView,
    MultiCrop,
    SingleCrop,
    TextView,
    ViewRecipe,
    aclip_views,
    clip_rocket_views,
    slip_views,
)

__all__ = ["Batch", "BlockMasking", "CropAugment", "EnclosingCrop", "ImageView", "MultiCrop", "SingleCrop", "TextView",
           "ViewRecipe", "aclip_views", "clip_rocket_views", "make_loader", "slip_views"]
