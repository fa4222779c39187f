"""`make_loader`: training shards -> Batches on the training device, resumable to the exact batch."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from datapipe.load.mixing import open_shards
from datapipe.load.samples import EpochPlan, batches_per_epoch
from datapipe.load.wordnet import package_data

log = logging.getLogger("datapipe")
BACKENDS = ("auto", "dali", "torch")


def _distributed_defaults(rank, world_size):
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: the rank must be in 0 .. world_size - 1")
    return rank, world_size


class Loader:
    """Iterates the rest of the current epoch; `set_epoch` moves to another one, and iterating again after
    an epoch has ended starts the next one.

    `state_dict()` after receiving batch k of epoch e resumes with batch k + 1 of epoch e, on any number of
    ranks with the same global batch (batch_size x world_size).
    `skipped` lists (key, reason) of every unreadable sample replaced so far.
    """

    def __init__(self, shards, recipe, batch_size, backend, device, rank, world_size, seed, epoch, dtype,
                 num_workers, shuffle_window, cache, mix_weights):
        for name, value in (("batch_size", batch_size), ("shuffle_window", shuffle_window)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: it must be a whole number of samples, at least 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: use 0 or more")
        recipe.check()
        if any(view.augments for view in recipe.text_views.values()):
            package_data()  # text augmentation's WordNet: a missing install fails here, not in a worker
        self.shards = open_shards(shards, mix_weights, cache)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.recipe, self.batch_size, self.device, self.dtype = recipe, batch_size, torch.device(device), dtype
        self.rank, self.world_size = _distributed_defaults(rank, world_size)
        self.seed, self.num_workers, self.shuffle_window = seed, num_workers, shuffle_window
        self.backend = self._pick_backend(backend)
        self.epoch, self.batches_done = epoch, 0
        self.skipped = []
        self.dali = None  # the DALI pipeline, built at the first epoch and fed every later one
        if len(self) == 0:
            raise ValueError(f"{self.shards.root}: {self.shards.total} samples do not fill one global batch of "
                             f"{batch_size} x {self.world_size} rank(s); lower batch_size")

    def _pick_backend(self, backend):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
        return "dali" if backend == "auto" else backend

    def __len__(self):
        return batches_per_epoch(self.shards.total, self.world_size, self.batch_size)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    @property
    def global_batch_size(self):
        return self.batch_size * self.world_size

    def state_dict(self):
        """Where the epoch's global sample sequence stands, and what that sequence depends on."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "shuffle_window": self.shuffle_window,
                "shards": self.shards.fingerprint, "world_size": self.world_size}

    def load_state_dict(self, state):
        """Continue the saved loader's sequence; refuses what would change it (any world size is fine)."""
        fixes = {"seed": "the same seed", "global_batch_size": "batch_size x world_size equal to it",
                 "shuffle_window": "the same shuffle_window",
                 "shards": "the same training shards and data.mix_weights (a manifest's shard list or the weights "
                          "changed since)"}
        mine = {name: value for name, value in self.state_dict().items() if name in fixes}
        for name, fix in fixes.items():
            if state.get(name) != mine[name]:
                raise ValueError(f"cannot resume exactly: the saved loader had {name}={state.get(name)}, this one has "
                                 f"{mine[name]}; resume with {fix}")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def __iter__(self):
        if self.batches_done >= len(self):  # the epoch is over: iterating again means the next one
            self.epoch, self.batches_done = self.epoch + 1, 0
        plan = EpochPlan(self.shards, self.recipe, self.batch_size, self.seed, self.epoch, self.rank,
                         self.world_size, self.shuffle_window)
        on_gpu = self.device.type == "cuda"
        if self.backend == "dali":
            if self.dali is None:
                from datapipe.load.dali import DaliBatches  # DALI is imported only when used

                self.dali = DaliBatches(self.recipe, self.batch_size, self.dtype, self.device,
                                        max(self.num_workers, 1))
            batches = self.dali.epoch(plan, self.batches_done)
        else:
            from datapipe.load.torch_ref import torch_batches

            batches = torch_batches(plan, self.batches_done, self.dtype, self.num_workers, pin_memory=on_gpu)
        for index, batch in batches:
            assert index == self.batches_done, f"batch {index} arrived when {self.batches_done} was due"
            for key, reason in batch.skipped:
                log.warning("skipped unreadable sample %s (%s); a reserve sample took its place", key, reason)
            self.skipped += batch.skipped
            self.batches_done += 1
            yield batch.to(self.device)


@dataclass(frozen=True)
class CacheOptions:
    """Where and how much of remote shards is kept on this machine, and how broken connections are retried."""

    folder: Path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harmony-pipe" / "shards"
    limit_gb: float = 50.0
    fetch_retries: int = 4  # further tries of a broken connection, waiting retry_wait_s, then twice as long, ...
    retry_wait_s: float = 1.0

    @property
    def limit_bytes(self):
        return int(self.limit_gb * 1e9)


def make_loader(shards, recipe, batch_size, *, backend="auto", device=None, rank=None, world_size=None, seed=0,
                epoch=0, dtype=torch.float32, num_workers=2, shuffle_window=4096, cache=CacheOptions(),
                mix_weights=()):
    """Batches of `recipe` views from the training shards in `shards`: a `make shards` output folder, or its
    s3://, gs:// or hf:// location, read through a local cache (`cache`: a CacheOptions); or a list of them
    mixed by `mix_weights` (one per set: 2 reads a set twice per epoch, 0.5 half of it; default 1 each).

    backend: "dali" (GPU decode when `device` is a CUDA device, else CPU threads), "torch"
    (torchvision in DataLoader workers, the reference), or "auto" (= "dali").
    device: where batches land; default "cuda" when CUDA is available, else "cpu".
    rank, world_size: default to torch.distributed's when initialized, else 0 and 1.
    dtype: of the image tensors (float32, bfloat16 or float16).
    num_workers: DataLoader workers (torch) or DALI threads.
    """
    return Loader(shards, recipe, batch_size, backend, device, rank, world_size, seed, epoch, dtype,
                  num_workers, shuffle_window, cache, mix_weights)
