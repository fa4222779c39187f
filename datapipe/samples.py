"""Which samples each rank reads in an epoch, and reading them from the training shards.

Order policy (both backends share it, so they yield the same keys):
1. Each epoch, the shard order is shuffled with (seed, epoch).
2. The samples of the shuffled shards, in file order, are cut into `world_size` contiguous, equal
   slices; rank r reads slice r. Ranks are disjoint, cover the epoch, read few shards each, and
   differ in size by nothing: uneven shard counts or sizes only move the cut points. The last
   `total % world_size` samples of the epoch are left out (other ones each epoch).
3. Within a rank, samples are shuffled inside windows of `shuffle_window` samples with
   (seed, epoch, rank).
4. Batches are consecutive runs of `batch_size`; the tail that does not fill a batch is the
   reserve that replaces samples found unreadable.
Samples are read by offset through the DALI index of each shard, so any position can be read
directly: resuming at batch k reads nothing before it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datapipe.masks import ibot_masks
from datapipe.shard_io import read_dali_index
from datapipe.text import CONTEXT_LENGTH, EOT_ID, SOT_ID

TOKEN_BYTES = CONTEXT_LENGTH * 4
JPEG_START = b"\xff\xd8"


@dataclass(frozen=True)
class ShardSet:
    """The training shards of one `make shards` output, from its manifest."""

    root: Path
    names: tuple[str, ...]  # tar file names
    sizes: tuple[int, ...]  # samples per shard

    @classmethod
    def from_path(cls, path):
        """`path`: the training-shard folder (holding manifest.json) or the manifest itself."""
        path = Path(path)
        manifest_path = path if path.suffix == ".json" else path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: point the loader at a folder written by "
                                    f"`make shards` (e.g. shards/demo/train)")
        manifest = json.loads(manifest_path.read_text())
        root = manifest_path.parent
        names = tuple(shard["name"] for shard in manifest["shards"])
        for name in names:
            if not name.endswith(".tar"):
                raise ValueError(f"{root / name}: the loader reads plain .tar shards with DALI indexes; "
                                 f"rebuild without --compress (compressed shards are for storage)")
            if not (root / name).is_file() or not (root / name).with_suffix(".idx").is_file():
                raise FileNotFoundError(f"{root / name} or its .idx is missing: run `make verify` and "
                                        f"rebuild the shards with `make shards`")
        if not names:
            raise ValueError(f"{manifest_path} lists no shards: every sample was rejected, see report.md")
        return cls(root, names, tuple(shard["samples"] for shard in manifest["shards"]))

    @property
    def total(self):
        return sum(self.sizes)


def batches_per_epoch(total, world_size, batch_size):
    return (total // world_size) // batch_size


def rank_order(shards, seed, epoch, rank, world_size, shuffle_window):
    """(n, 2) int64 array of (shard number, sample number in shard): this rank's samples this epoch, in order."""
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(shards.sizes))
    sizes = np.asarray(shards.sizes)[shard_order]
    ends = np.cumsum(sizes)
    per_rank = shards.total // world_size
    first, last = rank * per_rank, (rank + 1) * per_rank  # this rank's slice of the epoch's sequence
    pieces = []
    for position, shard in enumerate(shard_order):
        start = ends[position] - sizes[position]
        low, high = max(first, start), min(last, ends[position])
        if low < high:
            samples = np.arange(low - start, high - start)
            pieces.append(np.stack([np.full_like(samples, shard), samples], axis=1))
    order = np.concatenate(pieces)
    rng = np.random.default_rng([seed, epoch, rank])
    for start in range(0, len(order), shuffle_window):
        window = order[start:start + shuffle_window]
        window[:] = window[rng.permutation(len(window))]
    return order


class UnreadableSample(Exception):
    """A sample whose bytes cannot be used; the loader skips it and reports the reason."""


class SampleReader:
    """Reads one sample's JPEG and tokens by offset; checks what can be checked without decoding."""

    def __init__(self, shards):
        self.shards = shards
        self._indexes = {}
        self._files = {}

    def key(self, shard, sample):
        stem = self.shards.names[shard].removesuffix(".tar")
        return f"{stem}/{self._index(shard)[sample][0]}"

    def _index(self, shard):
        if shard not in self._indexes:
            self._indexes[shard] = read_dali_index((self.shards.root / self.shards.names[shard]).with_suffix(".idx"))
        return self._indexes[shard]

    def _read(self, shard, offset, size):
        if shard not in self._files:
            self._files[shard] = open(self.shards.root / self.shards.names[shard], "rb")  # noqa: SIM115 (kept open)
        handle = self._files[shard]
        handle.seek(offset)
        return handle.read(size)

    def read(self, shard, sample):
        """(jpeg bytes, tokens (77,) int64 array); raises UnreadableSample with the reason."""
        _, components = self._index(shard)[sample]
        for extension in ("jpg", "tokens"):
            if extension not in components:
                raise UnreadableSample(f"no .{extension} member")
        jpeg = self._read(shard, *components["jpg"])
        if not jpeg.startswith(JPEG_START):
            raise UnreadableSample("jpg does not start with a JPEG marker")
        token_bytes = self._read(shard, *components["tokens"])
        if len(token_bytes) != TOKEN_BYTES:
            raise UnreadableSample(f"tokens has {len(token_bytes)} bytes, expected {TOKEN_BYTES}")
        tokens = np.frombuffer(token_bytes, dtype="<i4").astype(np.int64)
        if tokens[0] != SOT_ID or EOT_ID not in tokens or tokens.max() > EOT_ID or tokens.min() < 0:
            raise UnreadableSample("tokens are not SOT ... EOT with ids in the CLIP vocabulary")
        return jpeg, tokens

    def close(self):
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self):  # DataLoader workers open their own files
        return {"shards": self.shards, "_indexes": {}, "_files": {}}


@dataclass
class RawBatch:
    """One batch before decoding: what both backends start from."""

    keys: list[str]
    jpegs: list[bytes]
    tokens: np.ndarray  # (B, 77) int64
    sample_seeds: list[int]  # per-sample seeds for augmentation randomness
    masks: np.ndarray | None  # (G, B, H, W) bool iBOT masks, or None
    skipped: list[tuple[str, str]]  # (key, reason) of samples replaced in this batch


class EpochPlan:
    """One rank's batches for one epoch; `read_batch(i)` is a pure function of i (any worker may call it)."""

    def __init__(self, shards, recipe, batch_size, seed, epoch, rank, world_size, shuffle_window):
        self.reader = SampleReader(shards)
        self.recipe, self.batch_size = recipe, batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.order = rank_order(shards, seed, epoch, rank, world_size, shuffle_window)
        self.num_batches = batches_per_epoch(shards.total, world_size, batch_size)
        self.reserve = self.order[self.num_batches * batch_size:]  # replaces unreadable samples

    def _candidates(self, position):
        """The sample at `position`, then reserve samples in an order fixed by the position."""
        yield self.order[position]
        for step in range(len(self.reserve)):
            yield self.reserve[(position + step) % len(self.reserve)]

    def read_batch(self, index):
        keys, jpegs, tokens, seeds, skipped = [], [], [], [], []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            for shard, sample in self._candidates(position):
                key = self.reader.key(shard, sample)
                try:
                    jpeg, sample_tokens = self.reader.read(shard, sample)
                except UnreadableSample as problem:
                    skipped.append((key, str(problem)))
                    continue
                keys.append(key)
                jpegs.append(jpeg)
                tokens.append(sample_tokens)
                seeds.append(self.sample_seed(position))
                break
        if not keys:
            raise RuntimeError(f"batch {index} of epoch {self.epoch}: no readable sample among "
                               f"{[key for key, _ in skipped][:5]}...; run `make verify`")
        readable = len(keys)
        while len(keys) < self.batch_size:  # no reserve left: repeat readable samples of this batch
            source = (len(keys) - readable) % readable
            keys.append(keys[source])
            jpegs.append(jpegs[source])
            tokens.append(tokens[source])
            seeds.append(self.sample_seed(index * self.batch_size + len(seeds)))
        masks = None
        if self.recipe.masking is not None:
            grid = self.recipe.mask_grid
            masks = np.stack([ibot_masks(np.random.default_rng(seed), self.recipe.masking, grid) for seed in seeds],
                             axis=1)  # (2, B, H, W)
        return RawBatch(keys, jpegs, np.stack(tokens), seeds, masks, skipped)

    def sample_seed(self, position):
        return int(np.random.SeedSequence([self.seed, self.epoch, self.rank, position]).generate_state(1)[0])
