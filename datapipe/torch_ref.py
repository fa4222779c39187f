"""The reference backend: Pillow decode and torchvision (v2) transforms in DataLoader worker processes.

Each crop is the official transform chain (HARMONY.md 5.2) on the decoded Pillow image, as the
official code does it. Every
sample's randomness is seeded by its position in the epoch plan, so the output does not depend
on the number of workers, and worker w makes batches w, w + n, w + 2n, ... which the DataLoader
hands back in plan order.
"""

import io
import math
import multiprocessing

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from datapipe.batch import assemble
from datapipe.samples import RawBatch


def crop_transform(crop, mean, std):
    """Pillow RGB image -> float32 (3, size, size), normalized."""
    steps = [
        v2.RandomResizedCrop(crop.size_px, crop.scale, crop.ratio, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(crop.flip_prob),
        v2.RandomApply([v2.ColorJitter(crop.brightness, crop.contrast, crop.saturation, crop.hue)],
                       p=crop.jitter_prob),
        v2.RandomGrayscale(crop.grayscale_prob),
    ]
    if crop.blur_prob > 0:
        kernel_px = 2 * math.ceil(3 * crop.blur_sigma[1]) + 1  # covers +-3 sigma of the widest blur
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_px, crop.blur_sigma)], p=crop.blur_prob))
    if crop.solarize_prob > 0:
        steps.append(v2.RandomSolarize(crop.solarize_threshold, crop.solarize_prob))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class MultiCropAugment:
    def __init__(self, recipe):
        self.transforms = [crop_transform(crop, recipe.mean, recipe.std) for crop in recipe.crops]

    def __call__(self, raw: RawBatch):
        """-> list over crops of (B, 3, H, W) float32; undecodable samples are replaced and recorded in raw."""
        images = []
        for position, jpeg in enumerate(raw.jpegs):
            try:
                images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            except (OSError, SyntaxError, ValueError) as error:
                raw.skipped.append((raw.keys[position], f"jpg does not decode: {error}"))
                images.append(None)
        readable = [position for position, image in enumerate(images) if image is not None]
        if not readable:
            raise RuntimeError(f"no sample of the batch starting with {raw.keys[0]} decodes; run `make verify`")
        per_sample = []
        for position, image in enumerate(images):
            if image is None:  # repeat a readable sample of this batch in its place
                source = readable[position % len(readable)]
                image, raw.keys[position] = images[source], raw.keys[source]
                raw.tokens[position] = raw.tokens[source]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(raw.sample_seeds[position])
                per_sample.append([transform(image) for transform in self.transforms])
        return [torch.stack(crops) for crops in zip(*per_sample, strict=True)]


class TorchBatches(IterableDataset):
    def __init__(self, plan, start_batch, dtype):
        self.plan, self.start_batch, self.dtype = plan, start_batch, dtype
        self.augment = MultiCropAugment(plan.recipe)

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index in range(self.start_batch + worker_id, self.plan.num_batches, num_workers):
            raw = self.plan.read_batch(index)
            yield index, assemble(self.augment(raw), raw, self.plan.recipe, self.dtype)


def _worker_context():
    """Workers start from a fork server, never by forking this process: a process that has run DALI's or
    torch's thread pools can deadlock its forked children. The server preloads this module, so
    workers start in a fraction of a second."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


UNGUARDED_SCRIPT = (
    "backend='torch' with num_workers > 0 starts worker processes from a fork server, and each worker runs the "
    "script that made the loader again from its top. Put the code that makes and iterates the loader under "
    "`if __name__ == \"__main__\":`, or pass num_workers=0, or use backend='dali' (threads, no processes).")


def torch_batches(plan, start_batch, dtype, num_workers, pin_memory):
    """Iterator of (batch index, Batch) in plan order."""
    if num_workers and getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are a worker still importing the user's script: the script has no __main__ guard.
        raise RuntimeError(f"a DataLoader worker re-ran your script: {UNGUARDED_SCRIPT}")
    # Its own generator: creating the iterator must not draw from the global RNG, or a resumed
    # training run would see different random numbers from an uninterrupted one.
    batches = iter(DataLoader(TorchBatches(plan, start_batch, dtype), batch_size=None, num_workers=num_workers,
                              pin_memory=pin_memory, prefetch_factor=2 if num_workers else None,
                              multiprocessing_context=_worker_context() if num_workers else None,
                              generator=torch.Generator().manual_seed(plan.seed)))
    try:
        yield from batches
    except RuntimeError as error:
        if "exited unexpectedly" not in str(error):
            raise
        raise RuntimeError(f"{error}: its error is printed above. If it says a worker re-ran your script: "
                           f"{UNGUARDED_SCRIPT}") from None
