"""The DALI backend: decode and multi-crop on the GPU (`mixed` decode) or on CPU threads.

The epoch plan feeds JPEG bytes through `external_source`, so DALI and the torch reference read
the same samples in the same order. Per crop, per sample, the same steps and probabilities as
the reference (HARMONY.md 5.2), with two differences in detail: DALI's colour twist applies
brightness, contrast, saturation and hue in a fixed order (torchvision picks a random order),
and its contrast pivots on mid-grey rather than on the image's mean grey. Flips are applied
last, inside crop_mirror_normalize; they commute with every other step.
"""

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from datapipe.batch import assemble


def _maybe(probability):
    """A per-sample boolean that is True with `probability`."""
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def _uniform(low, high):
    """Per-sample U(low, high); a constant when the range is a single value (DALI needs low < high)."""
    return float(low) if low == high else fn.random.uniform(range=[float(low), float(high)])


def _jitter_factor(applied, spread):
    """1 + U(-spread, spread) where the jitter applies, else 1 (per sample)."""
    return 1.0 if spread == 0 else 1.0 + applied * _uniform(-spread, spread)


def _blur_sometimes(images, crop):
    if _maybe(crop.blur_prob):  # a per-sample DALI conditional: only chosen samples are blurred
        images = fn.gaussian_blur(images, sigma=_uniform(*crop.blur_sigma))
    return images


def _solarize_sometimes(images, crop):
    if _maybe(crop.solarize_prob):
        inverted = 255 - images
        threshold = crop.solarize_threshold
        images = fn.cast((images < threshold) * images + (images >= threshold) * inverted, dtype=types.UINT8)
    return images


def _augment(images, crop, mean, std, crop_dtype):
    images = fn.random_resized_crop(images, size=[crop.size_px, crop.size_px], random_area=list(crop.scale),
                                    random_aspect_ratio=list(crop.ratio), interp_type=types.INTERP_CUBIC,
                                    antialias=True)
    if crop.jitter_prob > 0 or crop.grayscale_prob > 0:
        applied = fn.cast(fn.random.coin_flip(probability=float(crop.jitter_prob)), dtype=types.FLOAT)
        keep_colour = 1.0 - fn.cast(fn.random.coin_flip(probability=float(crop.grayscale_prob)), dtype=types.FLOAT)
        hue_degrees = 0.0 if crop.hue == 0 else applied * _uniform(-crop.hue * 360, crop.hue * 360)
        images = fn.color_twist(images, brightness=_jitter_factor(applied, crop.brightness),
                                contrast=_jitter_factor(applied, crop.contrast),
                                saturation=_jitter_factor(applied, crop.saturation) * keep_colour, hue=hue_degrees)
    if crop.blur_prob > 0:
        images = _blur_sometimes(images, crop)
    if crop.solarize_prob > 0:
        images = _solarize_sometimes(images, crop)
    return fn.crop_mirror_normalize(images, dtype=crop_dtype, output_layout="CHW",
                                    mean=[255 * value for value in mean], std=[255 * value for value in std],
                                    mirror=fn.random.coin_flip(probability=float(crop.flip_prob)))


@pipeline_def(enable_conditionals=True)
def _multicrop_pipeline(source, recipe, gpu, crop_dtype):
    jpegs = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    return tuple(_augment(images, crop, recipe.mean, recipe.std, crop_dtype) for crop in recipe.crops)


class DaliBatches:
    """Iterator of (batch index, Batch) in plan order, from `start_batch` to the end of the epoch."""

    def __init__(self, plan, start_batch, dtype, device, num_threads):
        self.plan, self.dtype = plan, dtype
        self.pending = {}  # batch index -> RawBatch fed to DALI and not yet returned
        self.next_index = start_batch
        gpu = device.type == "cuda"
        # DALI has no bf16: fp16 halves the transfer, and the cast to bf16 happens on the device.
        crop_dtype = types.FLOAT if dtype == torch.float32 else types.FLOAT16
        seed = int(np.random.SeedSequence([plan.seed, plan.epoch, plan.rank, start_batch]).generate_state(1)[0] >> 1)
        self.names = [f"crop{number}" for number in range(len(plan.recipe.crops))]
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        pipeline = _multicrop_pipeline(
            source=self._feed, recipe=plan.recipe, gpu=gpu, crop_dtype=crop_dtype,
            batch_size=plan.batch_size, num_threads=num_threads, seed=seed, device_id=device_id,
            prefetch_queue_depth=2)
        finished = start_batch >= plan.num_batches
        self.iterator = iter(()) if finished else DALIGenericIterator([pipeline], self.names, size=-1,
                                                                      auto_reset=False)

    def _feed(self, info):
        index = self.next_index + len(self.pending)
        if index >= self.plan.num_batches:
            raise StopIteration
        raw = self.plan.read_batch(index)
        self.pending[index] = raw
        return [np.frombuffer(jpeg, dtype=np.uint8) for jpeg in raw.jpegs]

    def __iter__(self):
        return self

    def __next__(self):
        index = self.next_index
        try:
            outputs = next(self.iterator)[0]
        except RuntimeError as error:
            keys = self.pending[index].keys if index in self.pending else []
            raise RuntimeError(
                f"DALI could not decode or augment batch {index} (first keys {keys[:3]}): "
                f"{str(error).splitlines()[0]}. Check the shards with `make verify`, or use backend='torch', "
                f"which skips undecodable samples.") from None
        raw = self.pending.pop(index)
        self.next_index += 1
        crops = [outputs[name] for name in self.names]
        return index, assemble(crops, raw, self.plan.recipe, self.dtype)
