"""Several shard sets read as one, each in proportion to its weight (open_clip's upsampling factors).

A weight says how many times a set is read per epoch: 2 lists every shard of the set twice, 1 once,
and a fraction f lists the first f x (samples of the set) samples of the set's shards taken in an
order shuffled with (seed, epoch, set): another part of the set each epoch, whole shards but the
last. The listed shards then go through the one epoch order of datapipe.load.samples (shard order
shuffled, samples shuffled within windows), so the sequence stays a function of (seed, epoch) only
and exact and elastic resume hold as for one set. The epoch length is the same every epoch.
Remote sets share one cache (one folder, one limit) that knows every set's next reads.
"""

import hashlib
import json
import math

import numpy as np

from datapipe.common.shard_io import read_dali_index
from datapipe.load.samples import ShardSet, open_binary, with_local_file
from datapipe.load.shard_cache import ShardCache

FRACTION_STREAM = 1  # keeps the fraction draws apart from the epoch order's (seed, epoch, window) streams
# An epoch's schedule lists a set's shards once per whole unit of its weight (and once more in part), and the epoch
# order holds a few numbers per listed shard: a weight reads a set at most MAX_WEIGHT times per epoch, and the
# listed shards of all sets together are at most MAX_LISTED_SHARDS, so the schedule's memory stays bounded.
MAX_WEIGHT = 1000
MAX_LISTED_SHARDS = 10_000_000


class ShardMixture:
    def __init__(self, sets, weights, cache_dir=None, cache_limit_bytes=None):
        """`sets`: ShardSets; `weights`: one positive number per set."""
        if len(weights) != len(sets):
            raise ValueError(f"data.mix_weights has {len(weights)} weight(s) for {len(sets)} shard set(s); give one "
                             f"per set of data.shards")
        for weight in weights:
            check_weight(weight)
        for shard_set, weight in zip(sets, weights, strict=True):
            check_samples_read(shard_set, weight)
        check_listed_shards(sets, weights)
        self.sets, self.weights = tuple(sets), tuple(float(weight) for weight in weights)
        self.first_shard = np.cumsum([0] + [len(shard_set.names) for shard_set in sets])  # of each set
        self.names = tuple(name for shard_set in sets for name in shard_set.names)
        self.sizes = tuple(size for shard_set in sets for size in shard_set.sizes)
        self.root = " + ".join(str(shard_set.root) for shard_set in sets)
        content = json.dumps([[shard_set.fingerprint, weight] for shard_set, weight in zip(sets, self.weights,
                                                                                           strict=True)])
        self.fingerprint = hashlib.sha256(content.encode()).hexdigest()[:16]
        remote = [shard_set.cache.shards if shard_set.cache else [None] * len(shard_set.names) for shard_set in sets]
        self.cache = ShardCache(cache_dir, cache_limit_bytes, [shard for shards in remote for shard in shards]) \
            if any(shard_set.cache for shard_set in sets) else None

    @property
    def total(self):
        """Samples per epoch (the same every epoch)."""
        return sum(int(weight) * sum(shard_set.sizes) + round(weight % 1 * sum(shard_set.sizes))
                   for shard_set, weight in zip(self.sets, self.weights, strict=True))

    def epoch_layout(self, seed, epoch):
        """(samples per listed shard, shard number of each): every set `weight` times, as the module says."""
        sizes, shards = [], []
        for number, (shard_set, weight) in enumerate(zip(self.sets, self.weights, strict=True)):
            first = int(self.first_shard[number])
            for _ in range(int(weight)):
                sizes += shard_set.sizes
                shards += range(first, first + len(shard_set.names))
            wanted = round(weight % 1 * sum(shard_set.sizes))
            order = np.random.default_rng([seed, epoch, number, FRACTION_STREAM]).permutation(len(shard_set.names))
            for shard in order.tolist():
                if wanted == 0:
                    break
                sizes.append(min(wanted, shard_set.sizes[shard]))  # the shard's first samples
                shards.append(first + shard)
                wanted -= sizes[-1]
        return sizes, shards

    def _locate(self, shard):
        number = int(np.searchsorted(self.first_shard, shard, side="right")) - 1
        return self.sets[number], shard - int(self.first_shard[number])

    def _files(self, shard):
        if self.cache is not None and self.cache.shards[shard] is not None:
            return self.cache.paths(shard)
        shard_set, local = self._locate(shard)
        return shard_set.local_files(local)

    def open_tar(self, shard):
        return with_local_file(self._files, shard, 0, open_binary, cached=self.cache is not None)

    def read_index(self, shard):
        return with_local_file(self._files, shard, 1, read_dali_index, cached=self.cache is not None)

    def shard_key(self, shard):
        """`<set number>:<tar stem>`: shards of two sets may have the same name."""
        shard_set, local = self._locate(shard)
        return f"{self.sets.index(shard_set)}:{shard_set.shard_key(local)}"


def check_weight(weight):
    """ValueError unless `weight` is a finite number above 0 and at most MAX_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_WEIGHT:
        raise ValueError(f"data.mix_weights: {weight!r} is not a finite number above 0 and at most {MAX_WEIGHT} "
                         f"(2 reads a set twice per epoch, 0.5 half of it; the epoch's schedule lists a set's shards "
                         f"once per unit of weight, so a weight is at most {MAX_WEIGHT})")


def samples_read(shard_set, weight):
    """Samples of `shard_set` an epoch reads at `weight` (as epoch_layout lists them)."""
    samples = sum(shard_set.sizes)
    return int(weight) * samples + round(weight % 1 * samples)


def check_samples_read(shard_set, weight):
    """ValueError when `weight` rounds the set's samples per epoch to 0, which would leave it out."""
    if samples_read(shard_set, weight) == 0:
        samples = sum(shard_set.sizes)
        raise ValueError(f"data.mix_weights: weight {weight!r} of {shard_set.root} reads round({weight!r} x {samples} "
                         f"samples) = 0 samples per epoch, so the set would never be read: give it more than "
                         f"0.5 / {samples} = {0.5 / samples:.3g}, or leave the set out of data.shards")


def check_listed_shards(sets, weights):
    """ValueError when the epoch's schedule would list more than MAX_LISTED_SHARDS shards."""
    listed = sum(math.ceil(weight) * len(shard_set.names) for shard_set, weight in zip(sets, weights, strict=True))
    if listed > MAX_LISTED_SHARDS:
        raise ValueError(f"data.mix_weights={list(weights)}: each epoch's schedule would list {listed} shards (a set's "
                         f"shards once per unit of weight), more than the {MAX_LISTED_SHARDS} it holds in memory: "
                         f"lower the weights of the sets with the most shards")


def open_shards(locations, weights, cache):
    """A ShardSet for one location (weights empty or [1]), else a ShardMixture; remote sets are read through the
    cache `cache` (a datapipe.load.loader.CacheOptions) describes."""
    if isinstance(locations, str | bytes) or not isinstance(locations, list | tuple):
        locations = [locations]
    weights = list(weights) if weights else [1] * len(locations)
    sets = [ShardSet.from_path(location, cache.folder, cache.limit_bytes, cache.fetch_retries, cache.retry_wait_s)
            for location in locations]
    if len(sets) == 1 and weights == [1]:
        return sets[0]
    return ShardMixture(sets, weights, cache.folder, cache.limit_bytes)
