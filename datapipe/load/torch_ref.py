"""The reference backend: Pillow decode and torchvision (v2) transforms in DataLoader worker processes.

Each crop is the official transform chain (docs/methods/harmony.md 5.2) on the decoded Pillow image, as the
official code does it, with the crop's interpolation; a derived view (A-CLIP's enclosing crop) is
drawn from the windows of the crops it encloses as on DALI. Every sample's randomness is seeded by
its position in the epoch plan, so the output does not depend on the number of workers, and worker
w makes batches w, w + n, w + 2n, ... which the DataLoader hands back in plan order.
"""

import io
import math
import multiprocessing
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from datapipe.common.object_store import StorageError
from datapipe.load.batch import assemble
from datapipe.load.draws import enclosing_draws, enclosing_windows
from datapipe.load.recipes import EnclosingCrop
from datapipe.load.samples import RawBatch

INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


class CropTransform:
    """Pillow RGB image -> (float32 (3, size, size) normalized, its window (top, left, height, width) in the image).

    The official chain (random resized crop, flip, jitter, grey, blur, solarize); the crop's own parameters are
    drawn as v2.RandomResizedCrop draws them when called, so the window can travel with the batch."""

    def __init__(self, crop, mean, std):
        self.resized_crop = v2.RandomResizedCrop(crop.size_px, crop.scale, crop.ratio,
                                                 interpolation=INTERPOLATION[crop.interpolation], antialias=True)
        steps = [
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
        self.photometric = v2.Compose(steps + to_normalized_tensor(mean, std))

    def __call__(self, image):
        window = self.resized_crop.make_params([image])
        crop = self.photometric(self.resized_crop.transform(image, window))
        return crop, (window["top"], window["left"], window["height"], window["width"])


class EnclosingTransform:
    """A-CLIP's zoom-out crop: the window around the enclosed crops' windows, drawn as on DALI (datapipe.load.draws)."""

    def __init__(self, view, crop_number, mean, std):
        self.view, self.crop_number = view, crop_number
        self.finish = v2.Compose(to_normalized_tensor(mean, std))

    def __call__(self, image, enclosed_windows, sample_seed):
        draws = enclosing_draws([sample_seed], self.crop_number)  # (1, 4)
        window = enclosing_windows(np.asarray(enclosed_windows)[:, None, :], [image.height], [image.width], draws)[0]
        crop = v2.functional.resized_crop(image, *window.tolist(), [self.view.size_px] * 2,
                                          interpolation=INTERPOLATION[self.view.interpolation], antialias=True)
        return self.finish(crop), tuple(window.tolist())


def to_normalized_tensor(mean, std):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class ViewsAugment:
    def __init__(self, recipe):
        self.recipe = recipe
        self.transforms = {}  # view name -> [CropTransform per crop] or EnclosingTransform
        for name, view in recipe.image_views.items():
            first = recipe.crop_slices[name].start
            self.transforms[name] = EnclosingTransform(view, first, recipe.mean, recipe.std) \
                if isinstance(view, EnclosingCrop) else [CropTransform(crop, recipe.mean, recipe.std)
                                                         for crop in view.crops]

    def _sample(self, image, sample_seed):
        """[(crop, window)] of one sample, every crop of every view in recipe order."""
        made = []
        for transform in self.transforms.values():
            if isinstance(transform, EnclosingTransform):
                enclosed = [window for _, window in made[self.recipe.crop_slices[transform.view.around]]]
                made.append(transform(image, enclosed, sample_seed))
            else:
                made += [crop_transform(image) for crop_transform in transform]
        return made

    def __call__(self, raw: RawBatch):
        """-> (list over crops of (B, 3, H, W) float32, list over crops of (B, 4) int windows); undecodable samples
        are replaced and recorded in raw."""
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
                for tokens in raw.texts.values():  # (n, B, 77)
                    tokens[:, position] = tokens[:, source]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(raw.sample_seeds[position])
                per_sample.append(self._sample(image, raw.sample_seeds[position]))
        per_crop = list(zip(*per_sample, strict=True))  # crops x samples of (crop, window)
        crops = [torch.stack([crop for crop, _ in samples]) for samples in per_crop]
        windows = [np.array([window for _, window in samples], dtype=np.int64) for samples in per_crop]
        return crops, windows


class TorchBatches(IterableDataset):
    def __init__(self, plan, start_batch, dtype):
        self.plan, self.start_batch, self.dtype = plan, start_batch, dtype
        self.augment = ViewsAugment(plan.recipe)
        # Workers come from a fork server that may have started before variables set since (object storage
        # credentials and endpoints): they take the environment of the process that made this loader.
        self.environment = dict(os.environ)

    def __iter__(self):
        worker = get_worker_info()
        if worker is not None:
            os.environ.clear()
            os.environ.update(self.environment)
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index in range(self.start_batch + worker_id, self.plan.num_batches, num_workers):
            try:
                raw = self.plan.read_batch(index)
            except StorageError as error:
                # Handed over as a batch, raised as it is by torch_batches: DataLoader would re-raise it with
                # the worker's traceback for its message.
                yield index, error
                return
            yield index, assemble(*self.augment(raw), raw, self.plan.recipe, self.dtype)


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
    """Iterator of (batch index, Batch) in plan order; a worker's StorageError is raised as the worker met it."""
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
        for index, batch in batches:
            if isinstance(batch, StorageError):
                raise batch
            yield index, batch
    except RuntimeError as error:
        if "exited unexpectedly" not in str(error):
            raise
        raise RuntimeError(f"{error}: its error is printed above. If it says a worker re-ran your script: "
                           f"{UNGUARDED_SCRIPT}") from None
