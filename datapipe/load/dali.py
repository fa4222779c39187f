"""The DALI backend: decode and crop a recipe's named views on the GPU (`mixed` decode) or on CPU threads.

The epoch plan feeds JPEG bytes through `external_source`, so DALI and the torch reference read
the same samples in the same order. Every random choice (crop window, flip, jitter factors, grey,
blur and its sigma, solarize) is drawn per sample by `datapipe.load.draws` from the sample's seed and fed
beside the bytes, so the augmentations do not depend on where a pipeline started: a resumed run
sees exactly what an uninterrupted one saw. Derived crops (A-CLIP's enclosing crop) are windows
drawn there too, so every crop of every view is one resize of a window; their windows are the boxes.
Per crop, the same steps and probabilities as the
reference (docs/methods/harmony.md 5.2), with two differences in detail: DALI's colour twist applies
brightness, contrast, saturation and hue in a fixed order (torchvision picks a random order), and
its contrast pivots on mid-grey rather than on the image's mean grey. Flips are applied last,
inside crop_mirror_normalize; they commute with every other step.

The pipeline is built once per loader: each epoch's plan is fed to the same pipeline, which the source tells
where an epoch ends (StopIteration), and the next epoch resets it (an epoch left early is first run out).
A sample DALI cannot decode (a truncated body, say) fails its whole batch: the batch's samples are
then decoded one by one to find it, it is marked unreadable in the plan, and a new pipeline is
built at that batch, where a reserve sample takes its place, as on the torch backend.
"""

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from datapipe.common.object_store import StorageError
from datapipe.load.batch import assemble
from datapipe.load.draws import COLUMN, recipe_parameters, windows_of

INTERPOLATION = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}


def _augment(images, crop, parameters, mean, std, crop_dtype):
    """One crop of every sample; `parameters` is this crop's (len(PARAMETERS),) float vector per sample."""
    images = fn.resize(images, size=[crop.size_px, crop.size_px], roi_start=parameters[0:2],
                       roi_end=parameters[2:4], roi_relative=False, interp_type=INTERPOLATION[crop.interpolation],
                       antialias=True)  # the window (top, left) to (bottom, right), then resized
    if crop.jitter_prob > 0 or crop.grayscale_prob > 0:
        images = fn.color_twist(images, brightness=parameters[COLUMN["brightness"]],
                                contrast=parameters[COLUMN["contrast"]], saturation=parameters[COLUMN["saturation"]],
                                hue=parameters[COLUMN["hue_degrees"]])
    if crop.blur_prob > 0:  # noqa: SIM102 (a Python choice around a per-sample DALI conditional)
        if parameters[COLUMN["blur"]] > 0.5:  # a per-sample DALI conditional: only chosen samples are blurred
            images = fn.gaussian_blur(images, sigma=parameters[COLUMN["blur_sigma"]])
    if crop.solarize_prob > 0:  # noqa: SIM102 (as above)
        if parameters[COLUMN["solarize"]] > 0.5:
            threshold = crop.solarize_threshold
            images = fn.cast((images < threshold) * images + (images >= threshold) * (255 - images),
                             dtype=types.UINT8)
    return fn.crop_mirror_normalize(images, dtype=crop_dtype, output_layout="CHW",
                                    mean=[255 * value for value in mean], std=[255 * value for value in std],
                                    mirror=fn.cast(parameters[COLUMN["flip"]], dtype=types.INT32))


@pipeline_def(enable_conditionals=True)
def _views_pipeline(source, recipe, gpu, crop_dtype):
    jpegs, *parameters = fn.external_source(source=source, num_outputs=1 + len(recipe.crops), batch=True,
                                            batch_info=True, dtype=[types.UINT8] + [types.FLOAT] * len(recipe.crops))
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    # DALI's autograph has no zip(strict=...): the two lists have one entry per crop by construction.
    return tuple(_augment(images, crop, parameters[number], recipe.mean, recipe.std, crop_dtype)
                 for number, crop in enumerate(recipe.crops))


@pipeline_def(batch_size=1, num_threads=1)
def _decode_pipeline(source, gpu):
    jpeg = fn.external_source(source=source, batch=False, dtype=types.UINT8)
    return fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)


class DaliBatches:
    """A loader's DALI pipeline, built once and fed every epoch: `epoch(plan, start_batch)` iterates (batch index,
    Batch) of that epoch's plan from `start_batch` to its end. The source ends an epoch by raising StopIteration
    and the next epoch resets the same pipeline; only an undecodable sample makes a new one (module docstring)."""

    def __init__(self, recipe, batch_size, dtype, device, num_threads):
        self.recipe, self.batch_size, self.dtype, self.num_threads = recipe, batch_size, dtype, num_threads
        self.gpu = device.type == "cuda"
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        # DALI has no bf16: fp16 halves the transfer, and the cast to bf16 happens on the device.
        self.crop_dtype = types.FLOAT if dtype == torch.float32 else types.FLOAT16
        self.names = [f"crop{number}" for number in range(len(recipe.crops))]
        self.iterator = None  # DALI's, over the one pipeline
        self.builds = 0  # pipelines built so far: one per loader, plus one per undecodable batch met
        self.epoch_over = True  # the iterator reached the end of its epoch (DALI resets only then)
        self.iteration = 0  # which epoch() call feeds the pipeline now: an older iteration stops
        self.plan, self.pending, self.windows, self.next_index, self.feed_end = None, {}, {}, 0, 0
        self.storage_error = None  # a remote shard that could not be fetched

    def epoch(self, plan, start_batch):
        """(batch index, Batch) of `plan` from `start_batch` to the end of its epoch, through the one pipeline."""
        self._end_epoch()
        self.iteration += 1
        self.plan, self.storage_error = plan, None
        self.pending = {}  # batch index -> RawBatch fed to DALI and not yet returned
        self.windows = {}  # batch index -> [(B, 4) (top, left, height, width) per crop] of a pending batch
        self.next_index, self.feed_end = start_batch, plan.num_batches
        if start_batch >= plan.num_batches:
            return iter(())
        if self.iterator is None:
            self._build()
        else:
            self.iterator.reset()  # the pipeline asks the source for this epoch's first batches
        self.epoch_over = False
        return self._batches(self.iteration)

    def _build(self):
        """A new pipeline whose first batch is `self.next_index` (its output depends on nothing else)."""
        pipeline = _views_pipeline(
            source=self._feed, recipe=self.recipe, gpu=self.gpu, crop_dtype=self.crop_dtype,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            prefetch_queue_depth=2)
        self.iterator = DALIGenericIterator([pipeline], self.names, size=-1, auto_reset=False)
        self.builds += 1

    def _end_epoch(self):
        """An epoch left before its end still has batches in the pipeline's queue: the source ends it now and the
        queue is emptied, so that the next epoch starts from a pipeline at an epoch's end."""
        if self.iterator is None or self.epoch_over:
            return
        self.feed_end = 0  # the source's next call ends the epoch
        try:
            for _ in self.iterator:
                pass
        except RuntimeError:  # a batch thrown away failed: the next epoch builds a new pipeline
            self.iterator = None
        self.epoch_over = True

    def _feed(self, info):
        index = self.next_index + len(self.pending)
        if index >= self.feed_end:
            raise StopIteration
        try:
            raw = self.plan.read_batch(index)
        except StorageError as error:  # DALI re-raises it as its own RuntimeError: keep it to raise as it is
            self.storage_error = error
            raise
        self.pending[index] = raw
        parameters = recipe_parameters(self.recipe, raw.sample_seeds, raw.sizes_px)
        self.windows[index] = [windows_of(crop) for crop in parameters]
        return [[np.frombuffer(jpeg, dtype=np.uint8) for jpeg in raw.jpegs], *parameters]

    def _undecodable(self, raw):
        """[(location, reason)] of the samples of `raw` that DALI's decoder refuses, one at a time."""
        found = []
        for location, jpeg in zip(raw.locations, raw.jpegs, strict=True):
            pipeline = _decode_pipeline(source=_constant(np.frombuffer(jpeg, dtype=np.uint8)), gpu=self.gpu,
                                        device_id=self.device_id)
            try:
                pipeline.run()
            except RuntimeError as error:
                found.append((location, f"jpg does not decode: {_first_message(error)}"))
        return found

    def _batches(self, iteration):
        while True:
            if iteration != self.iteration:
                raise RuntimeError("this loader was iterated again: its DALI pipeline now feeds the newer iteration")
            index = self.next_index
            try:
                outputs = next(self.iterator)[0]
            except StopIteration:
                self.epoch_over = True
                return
            except RuntimeError as error:
                self._replace_undecodable(index, error)
                self.pending, self.windows = {}, {}
                self._build()  # the same batch again, with reserve samples in place of the undecodable ones
                continue
            raw, windows = self.pending.pop(index), self.windows.pop(index)
            self.next_index += 1
            crops = [outputs[name] for name in self.names]
            yield index, assemble(crops, windows, raw, self.recipe, self.dtype)

    def _replace_undecodable(self, index, error):
        """After DALI failed at batch `index`: the samples it cannot decode marked unreadable in the plan, or the
        error raised when the data is not what failed."""
        if self.storage_error is not None:
            raise self.storage_error from None
        failed = [raw for number, raw in sorted(self.pending.items()) if number >= index]
        undecodable = [found for raw in failed for found in self._undecodable(raw)]
        checked = sum(len(raw.jpegs) for raw in failed)
        if not undecodable or len(undecodable) == checked:  # none or all: the data is not what failed
            keys = self.pending[index].keys if index in self.pending else []
            raise RuntimeError(
                f"DALI failed on batch {index} (first keys {keys[:3]}): {_first_message(error)}; decoded one "
                f"at a time, {len(undecodable)} of its {checked} samples fail. Check the shards with "
                f"`make verify`, or try backend='torch'.") from None
        for location, reason in undecodable:
            self.plan.mark_unreadable(location, reason)


def _constant(value):
    """An external_source callback that takes no argument and gives `value`."""
    return lambda: value


def _first_message(error):
    """The first line of a DALI error that says something (DALI prefixes 'Critical error in pipeline:')."""
    lines = [line for line in str(error).splitlines() if line.strip() and "Critical error" not in line]
    return (lines or [str(error)])[0].strip()
