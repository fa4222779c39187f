"""Which samples each rank reads in an epoch, and reading them from the training shards.

Order policy (both backends share it, so they yield the same keys):
1. Each epoch has one global sample sequence, a pure function of (shards, seed, epoch,
   shuffle_window): the shard order is shuffled with (seed, epoch), and the samples of the shuffled
   shards, in file order, are shuffled inside consecutive windows of `shuffle_window` samples
   with (seed, epoch, window).
2. Global batch b is positions [b * G, (b + 1) * G) of the sequence, G = batch_size * world_size;
   rank r takes the r-th run of batch_size positions in it. The number of ranks therefore only
   changes who reads a sample, never the sequence: a run may resume on another number of ranks
   with the same global batch and continue it, none repeated and none skipped (elastic resume).
3. The tail of the sequence that does not fill a global batch is the reserve that replaces
   samples found unreadable (other samples each epoch).
4. Every random draw for a sample (crops, colour, masks, caption changes) comes from its seed, a function of
   (seed, epoch, position in the sequence): never of where a run started or how many ranks it has.
Samples are read by offset through the DALI index of each shard, so any position can be read
directly: resuming at batch k reads nothing before it.
"""

import hashlib
import io
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL.JpegImagePlugin import JpegImageFile

from datapipe.common.captions import CONTEXT_LENGTH, EOT_ID, SOT_ID
from datapipe.common.manifest import REMOTE_FIELDS, ManifestError, parse_manifest, read_manifest
from datapipe.common.object_store import RemoteFolder, StorageError, is_remote
from datapipe.common.shard_io import read_dali_index
from datapipe.load.caption_views import view_tokens
from datapipe.load.ibot_masks import view_masks
from datapipe.load.shard_cache import RemoteShard, ShardCache, source_id
from datapipe.load.shard_schedule import ShardSchedule

TOKEN_BYTES = CONTEXT_LENGTH * 4
JPEG_START = b"\xff\xd8"


@dataclass(frozen=True)
class ShardSet:
    """The training shards of one `make shards` output, from its manifest: a local folder, or an object-storage
    location read through a local cache."""

    root: Path | str  # the folder, or the location URL (s3://, gs://, hf://)
    names: tuple[str, ...]  # tar file names
    sizes: tuple[int, ...]  # samples per shard
    fingerprint: str = ""  # of the manifest's shard list (names, sizes, hashes): what a resume must find again
    cache: ShardCache | None = field(default=None, compare=False)  # for a remote set

    @classmethod
    def from_path(cls, path, cache_dir=None, cache_limit_bytes=None, fetch_retries=4, retry_wait_s=1.0):
        """`path`: the training-shard folder (holding manifest.json) or the manifest itself; a remote one is read
        through a cache in `cache_dir` of at most `cache_limit_bytes`."""
        if is_remote(path):
            return cls._from_remote(str(path), cache_dir, cache_limit_bytes, fetch_retries, retry_wait_s)
        path = Path(path)
        manifest_path = path if path.suffix == ".json" else path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: point the loader at a folder written by "
                                    f"`make shards` (e.g. shards/demo/train)")
        manifest = read_manifest(manifest_path)  # shards named as plain files in its folder, or a ManifestError
        root = manifest_path.parent
        names = _plain_tar_names(manifest, root)
        for name in names:
            if not (root / name).is_file() or not (root / name).with_suffix(".idx").is_file():
                raise FileNotFoundError(f"{root / name} or its .idx is missing: run `make verify` and "
                                        f"rebuild the shards with `make shards`")
        return cls(root, names, tuple(shard["samples"] for shard in manifest["shards"]), _fingerprint(manifest))

    @classmethod
    def _from_remote(cls, location, cache_dir, cache_limit_bytes, fetch_retries, retry_wait_s):
        location = location.rstrip("/").removesuffix("/manifest.json")
        remote = RemoteFolder(location, fetch_retries, retry_wait_s)
        try:
            manifest = parse_manifest(remote.read_bytes("manifest.json"), remote.url("manifest.json"), REMOTE_FIELDS)
        except ManifestError as error:
            raise StorageError(str(error)) from None
        names = _plain_tar_names(manifest, location)
        sizes = remote.sizes()
        shards = []
        for entry in manifest["shards"]:
            index_name = entry.get("index", entry["name"].removesuffix(".tar") + ".idx")
            missing = [name for name in (entry["name"], index_name) if name not in sizes]
            if missing:
                raise StorageError(f"{remote.url(missing[0])} is listed in its manifest but missing: re-publish the "
                                   f"shards with `make shards OUT={location.rsplit('/', 1)[0]}`")
            stem = f"{source_id(location)}-{entry['name'].removesuffix('.tar')}"
            shards.append(RemoteShard(remote, stem, entry["name"], entry["bytes"], entry["sha256"], index_name,
                                      sizes[index_name], entry["samples"]))
        cache = ShardCache(cache_dir, cache_limit_bytes, shards)
        return cls(location, names, tuple(shard["samples"] for shard in manifest["shards"]), _fingerprint(manifest),
                   cache)

    def local_files(self, shard):
        """(tar path, index path) on this machine of shard number `shard` (a remote one is fetched if missing)."""
        if self.cache is not None:
            return self.cache.paths(shard)
        tar_path = self.root / self.names[shard]
        return tar_path, tar_path.with_suffix(".idx")

    def open_tar(self, shard):
        return with_local_file(self.local_files, shard, 0, open_binary, cached=self.cache is not None)

    def read_index(self, shard):
        return with_local_file(self.local_files, shard, 1, read_dali_index, cached=self.cache is not None)

    def shard_key(self, shard):
        """The shard's part of a sample's key."""
        return self.names[shard].removesuffix(".tar")

    def epoch_layout(self, seed, epoch):
        """(samples per listed shard, shard number of each or None when listed as they are): one set is read once
        per epoch, shard by shard (a ShardMixture lists shards again or in part)."""
        return self.sizes, None

    @property
    def total(self):
        return sum(self.sizes)


def open_binary(path):
    return open(path, "rb")


def with_local_file(files, shard, which, action, cached):
    """action(path) of the shard's tar (which=0) or index (1) from `files(shard)`; a cached file another process
    evicted between the look-up and the open is fetched again."""
    while True:
        try:
            return action(files(shard)[which])
        except FileNotFoundError:
            if not cached:
                raise


def _plain_tar_names(manifest, root):
    names = tuple(shard["name"] for shard in manifest["shards"])
    for name in names:
        if not name.endswith(".tar"):
            raise ValueError(f"{root}/{name}: the loader reads plain .tar shards with DALI indexes; "
                             f"rebuild without --compress (compressed shards are for storage)")
    if not names:
        raise ValueError(f"{root}/manifest.json lists no shards: every sample was rejected, see report.md")
    return names


def _fingerprint(manifest):
    content = json.dumps([[shard["name"], shard["samples"], shard.get("sha256")] for shard in manifest["shards"]])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def batches_per_epoch(total, world_size, batch_size):
    return total // (world_size * batch_size)


class EpochOrder:
    """The epoch's global sample sequence: `order[positions]` -> (n, 2) (shard number, sample number in shard).

    Computed a window at a time (a few recent windows are kept), so memory does not grow with the dataset."""

    CACHED_WINDOWS = 4

    def __init__(self, sizes, seed, epoch, shuffle_window, physical=None):
        """`physical`: the shard number of each entry of `sizes` when the epoch lists shards again or in part (a
        prefix of its samples); None when `sizes` are the shards themselves."""
        self.seed, self.epoch, self.window_size = seed, epoch, shuffle_window
        self.physical = None if physical is None else np.asarray(physical, dtype=np.int64)
        self.shard_order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
        sizes = np.asarray(sizes)[self.shard_order]
        self.ends = np.cumsum(sizes)  # sequence positions where each shuffled shard ends
        self.starts = self.ends - sizes
        self.total = int(self.ends[-1]) if len(sizes) else 0
        self._windows = {}

    def _window(self, number):
        """Sequence indices (before shuffling) of window `number`, in their shuffled order."""
        if number not in self._windows:
            start = number * self.window_size
            count = min(self.window_size, self.total - start)
            permutation = np.random.default_rng([self.seed, self.epoch, number]).permutation(count)
            if len(self._windows) == self.CACHED_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            self._windows[number] = start + permutation
        return self._windows[number]

    def __getitem__(self, positions):
        positions = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        unshuffled = np.empty_like(positions)
        for window in np.unique(positions // self.window_size):
            chosen = positions // self.window_size == window
            unshuffled[chosen] = self._window(int(window))[positions[chosen] - window * self.window_size]
        slot = np.searchsorted(self.ends, unshuffled, side="right")  # which shuffled shard holds it
        listed = self.shard_order[slot]
        shard = listed if self.physical is None else self.physical[listed]
        return np.stack([shard, unshuffled - self.starts[slot]], axis=1)


def epoch_order(shards, seed, epoch, shuffle_window):
    """The EpochOrder of a ShardSet or ShardMixture."""
    sizes, physical = shards.epoch_layout(seed, epoch)
    return EpochOrder(sizes, seed, epoch, shuffle_window, physical)


def rank_positions(batch_index, rank, world_size, batch_size):
    """Sequence positions of this rank's share of global batch `batch_index`."""
    first = batch_index * world_size * batch_size + rank * batch_size
    return np.arange(first, first + batch_size)


def rank_order(shards, seed, epoch, rank, world_size, batch_size, shuffle_window):
    """(n, 2) int64 array of (shard number, sample number in shard): this rank's samples this epoch, in order."""
    order = epoch_order(shards, seed, epoch, shuffle_window)
    batches = batches_per_epoch(shards.total, world_size, batch_size)
    positions = [rank_positions(batch, rank, world_size, batch_size) for batch in range(batches)]
    return order[np.concatenate(positions)] if positions else np.empty((0, 2), dtype=np.int64)


class UnreadableSample(Exception):
    """A sample whose bytes cannot be used; the loader skips it and reports the reason."""


class SampleReader:
    """Reads one sample's JPEG and tokens by offset; checks what can be checked without decoding."""

    OPEN_FILES = 64  # shards kept open at once, least recently used closed first

    def __init__(self, shards):
        self.shards = shards
        self._indexes = {}
        self._files = OrderedDict()

    def key(self, shard, sample):
        stem = self.shards.shard_key(shard)
        return f"{stem}/{self._index(shard)[sample][0]}"

    def _index(self, shard):
        if shard not in self._indexes:
            self._indexes[shard] = self.shards.read_index(shard)
        return self._indexes[shard]

    def _read(self, shard, offset, size):
        if shard not in self._files:
            if len(self._files) == self.OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            self._files[shard] = self.shards.open_tar(shard)
        self._files.move_to_end(shard)
        handle = self._files[shard]
        handle.seek(offset)
        return handle.read(size)

    def read(self, shard, sample):
        """(jpeg bytes, (height, width) px, tokens (77,) int64 array); raises UnreadableSample with the reason."""
        _, components = self._index(shard)[sample]
        for extension in ("jpg", "tokens"):
            if extension not in components:
                raise UnreadableSample(f"no .{extension} member")
        jpeg = self._read(shard, *components["jpg"])
        if not jpeg.startswith(JPEG_START):
            raise UnreadableSample("jpg does not start with a JPEG marker")
        size_px = jpeg_size(jpeg)
        token_bytes = self._read(shard, *components["tokens"])
        if len(token_bytes) != TOKEN_BYTES:
            raise UnreadableSample(f"tokens has {len(token_bytes)} bytes, expected {TOKEN_BYTES}")
        tokens = np.frombuffer(token_bytes, dtype="<i4").astype(np.int64)
        if tokens[0] != SOT_ID or EOT_ID not in tokens or tokens.max() > EOT_ID or tokens.min() < 0:
            raise UnreadableSample("tokens are not SOT ... EOT with ids in the CLIP vocabulary")
        return jpeg, size_px, tokens

    def read_caption(self, shard, sample):
        """The cleaned caption `make shards` stored beside the tokens (text views augment it)."""
        _, components = self._index(shard)[sample]
        if "txt" not in components:
            raise ValueError(f"{self.key(shard, sample)} has no .txt member: a recipe with augmented text views needs "
                             f"the caption; rebuild the shards with `make shards`")
        return self._read(shard, *components["txt"]).decode("utf-8", errors="replace")

    def close(self):
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self):  # DataLoader workers open their own files
        return {"shards": self.shards, "_indexes": {}, "_files": OrderedDict()}


def jpeg_size(jpeg):
    """(height, width) px from the JPEG's header, without decoding it; UnreadableSample if the header is broken.

    The crop windows are drawn from the image size before DALI decodes it, so a damaged header is caught here."""
    try:
        # The JPEG header alone: no decode and no warning. (Silencing warnings around Image.open per sample would
        # reset Python's show-once record, so every other warning would print again at every step.)
        width, height = JpegImageFile(io.BytesIO(jpeg)).size
    except Exception as error:  # noqa: BLE001 (Pillow raises many types for broken headers)
        raise UnreadableSample(f"jpg header does not parse ({type(error).__name__}: {error})") from None
    if width < 1 or height < 1:
        raise UnreadableSample(f"jpg header gives a {width}x{height} image")
    return height, width


@dataclass
class RawBatch:
    """One batch before decoding: what both backends start from."""

    keys: list[str]
    locations: list[tuple[int, int]]  # (shard number, sample number in shard) of each sample
    jpegs: list[bytes]
    sizes_px: list[tuple[int, int]]  # (height, width) of each image, from its header
    texts: dict[str, np.ndarray]  # text view name -> (n, B, 77) int64 tokens
    sample_seeds: list[int]  # per-sample seeds for augmentation randomness
    masks: dict[str, np.ndarray]  # image view name -> (n, B, H, W) bool iBOT masks, views with masking only
    skipped: list[tuple[str, str]]  # (key, reason) of samples replaced in this batch


class EpochPlan:
    """One rank's batches for one epoch; `read_batch(i)` is a pure function of i and of which samples are
    unreadable (any worker may call it)."""

    def __init__(self, shards, recipe, batch_size, seed, epoch, rank, world_size, shuffle_window):
        self.reader = SampleReader(shards)
        self.recipe, self.batch_size = recipe, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.order = epoch_order(shards, seed, epoch, shuffle_window)
        self.num_batches = batches_per_epoch(shards.total, world_size, batch_size)
        self.reserve_start = self.num_batches * world_size * batch_size  # the tail replaces unreadable samples
        self.found_unreadable = {}  # (shard, sample) -> reason, found by a backend after reading (decoding)
        self.cache = shards.cache
        if self.cache is not None:
            self.cache.follow(ShardSchedule(self.order, world_size * batch_size))

    def _candidates(self, position, location):
        """The sample at `position` (its `location`), then reserve samples in an order fixed by the position."""
        yield location
        reserve = self.order.total - self.reserve_start
        for step in range(reserve):
            yield tuple(self.order[self.reserve_start + (position + step) % reserve][0].tolist())

    def _read(self, location):
        """(key, location, jpeg, size, tokens) of the sample at `location` (shard number, sample number);
        raises UnreadableSample(key, reason)."""
        key = self.reader.key(*location)
        if location in self.found_unreadable:
            raise UnreadableSample(key, self.found_unreadable[location])
        try:
            return (key, location, *self.reader.read(*location))
        except UnreadableSample as problem:
            raise UnreadableSample(key, str(problem)) from None

    def mark_unreadable(self, location, reason):
        """Record a sample a backend could not decode; batches read from now on replace it."""
        self.found_unreadable[location] = reason

    def read_batch(self, index):
        keys, locations, jpegs, sizes, tokens, skipped = [], [], [], [], [], []
        positions = rank_positions(index, self.rank, self.world_size, self.batch_size)
        if self.cache is not None:
            self.reader.close()  # a cached shard evicted since frees its disk space once no reader holds it open
            self.cache.advance(int(positions[0]))
        first_choices = self.order[positions].tolist()  # one look-up for the whole batch
        positions = positions.tolist()
        for position, location in zip(positions, first_choices, strict=True):
            for candidate in self._candidates(position, tuple(location)):
                try:
                    key, location, jpeg, size_px, sample_tokens = self._read(candidate)
                except UnreadableSample as problem:
                    skipped.append(problem.args)
                    continue
                for values, value in ((keys, key), (locations, location), (jpegs, jpeg), (sizes, size_px),
                                      (tokens, sample_tokens)):
                    values.append(value)
                break
        if not keys:
            raise RuntimeError(f"batch {index} of epoch {self.epoch}: no readable sample among "
                               f"{[key for key, _ in skipped][:5]}...; run `make verify`")
        readable = len(keys)
        while len(keys) < self.batch_size:  # no reserve left: repeat readable samples of this batch
            source = (len(keys) - readable) % readable
            for values in (keys, locations, jpegs, sizes, tokens):
                values.append(values[source])
        seeds = [self.sample_seed(position) for position in positions]
        augmented = any(view.augments for view in self.recipe.text_views.values())
        captions = [self.reader.read_caption(*location) for location in locations] if augmented else None
        texts = view_tokens(self.recipe, np.stack(tokens), captions, seeds)
        return RawBatch(keys, locations, jpegs, sizes, texts, seeds, view_masks(self.recipe, seeds), skipped)

    def sample_seed(self, position):
        """The seed of every random draw for the sample at global sequence `position` this epoch."""
        return int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])
