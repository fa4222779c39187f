"""When each shard is read next, from the epoch's global sample order (what the shard cache prefetches by).

The global sequence walks the shuffled shards in order and shuffles samples only inside windows of
`shuffle_window` positions (datapipe.load.samples), so the shards a window reads are a run of consecutive
shuffled shards. Time is counted in windows: a shard overlapping the current window is needed now (0
windows away), the shard first read k windows later is k away, and a shard whose samples all lie
before the current window is not read again this epoch (infinitely far).
"""

import math

import numpy as np


class ShardSchedule:
    def __init__(self, order, global_batch_size):
        """`order`: the epoch's datapipe.load.samples.EpochOrder."""
        self.order, self.global_batch_size = order, global_batch_size
        self.window_size = order.window_size
        # The shard read at each place of the shuffled order (a mixture lists some shards more than once).
        listed = order.shard_order
        self.shard_in_order = listed if order.physical is None else order.physical[listed]
        self.slots_of = {}  # shard number -> its places in the shuffled order, ascending
        for slot, shard in enumerate(self.shard_in_order.tolist()):
            self.slots_of.setdefault(shard, []).append(slot)
        self.window = 0  # the window of the batch being read now

    def advance(self, position):
        """The reader is at global sequence `position`."""
        self.window = position // self.window_size

    def next_use(self, shard):
        """Windows from now until `shard` is read (0: now; math.inf: not again this epoch)."""
        window_start = self.window * self.window_size
        for slot in self.slots_of.get(shard, ()):
            if self.order.ends[slot] > window_start:
                return max(0, int(self.order.starts[slot]) // self.window_size - self.window)
        return math.inf

    def upcoming(self):
        """Shard numbers still to be read this epoch, in the order they are first read."""
        first_slot = int(np.searchsorted(self.order.ends, self.window * self.window_size, side="right"))
        return list(dict.fromkeys(self.shard_in_order[first_slot:].tolist()))

    def peak_bytes(self, shard_bytes):
        """The most bytes of shards that one batch's reads need on disk at once: those overlapping a window
        and the next global batch after it (a batch may straddle two windows)."""
        bytes_in_order = np.asarray(shard_bytes, dtype=np.int64)[self.shard_in_order]
        cumulative = np.concatenate([[0], np.cumsum(bytes_in_order)])
        window_starts = np.arange(0, self.order.total, self.window_size)
        first = np.searchsorted(self.order.ends, window_starts, side="right")
        last = np.searchsorted(self.order.starts, window_starts + self.window_size + self.global_batch_size,
                               side="left")
        return int((cumulative[last] - cumulative[first]).max()) if len(window_starts) else 0
