"""Pass 2, first step: exact duplicates (the same decoded pixels) among the candidates; the first in key order
is kept. Memory: 32 bytes per candidate, plus the sort's temporaries."""

import dataclasses

import numpy as np

from datapipe.shards.work import read_records


def find_duplicates(records_paths, hashing):
    """Exact duplicates among the accepted samples ("candidates"), in order: raw shards in name order, keys in
    order within each. Returns (candidates per raw shard, first (n,) int64: the candidate each one duplicates,
    itself for the first of its pixels, and with `hashing` their perceptual hashes (n,) uint64, else None).
    32 bytes per candidate, plus the sort's temporaries."""
    counts, digests, hashes = [], bytearray(), bytearray()
    for records_path in records_paths:
        before = len(digests)
        for record in read_records(records_path):
            if record["reason"] is None:
                digests += bytes.fromhex(record["digest"])[:16]  # 128 bits of sha256
                if hashing:
                    hashes += bytes.fromhex(record["phash"])
        counts.append((len(digests) - before) // 16)
    digests = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests stay in candidate order
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (digests[order[1:]] != digests[order[:-1]]).any(axis=1)
    del digests
    group = np.cumsum(starts) - 1  # the group (distinct digest) of each sorted position
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][group]
    return (np.asarray(counts, dtype=np.int64), first,
            np.frombuffer(hashes, dtype=">u8").astype(np.uint64) if hashing else None)


@dataclasses.dataclass(frozen=True)
class ExactDuplicates:
    """The candidates dropped as exact duplicates (sorted) and the candidate each has the same pixels as."""

    index: np.ndarray  # (d,) int64 candidate indices
    original: np.ndarray  # (d,) int64: the first candidate in key order with the same pixels

    @classmethod
    def from_first(cls, first):
        """From `first` as find_duplicates returns it: every candidate that is not the first of its pixels."""
        index = np.flatnonzero(first != np.arange(len(first)))
        return cls(index, first[index])
