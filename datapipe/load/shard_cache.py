"""A bounded local cache of remote training shards, shared by every process on a node.

Each cached shard is its tar and DALI index, named `<source>-<stem>.tar/.idx` in the cache folder
(`<source>` is a hash of the shard set's location, so several sets share one folder and one limit).
Background threads fetch the shards the coming batches read, in the order they are read
(datapipe.load.shard_schedule), while they fit under the limit; to make room the cache evicts the cached
shard whose next read is farthest away (Belady's rule; shards of other sets and shards this epoch has
finished with first), and never one that is read sooner than the shard it makes room for. A reader
that finds its shard missing fetches it at once.

A fetched tar is checked against the manifest's size and sha256, and its index against the tar's size
and sample count, before it is renamed into place; a mismatch (or an object replaced while it is read)
is fetched once more, then refused with the shard's name. A shard found in the cache is checked the
same way once per process and file version (inode, size, mtime): a damaged copy is removed and fetched
again. A fetch that fails removes its `.partial` files; a full disk is reported with the cache folder,
the bytes needed and free. Processes coordinate through `flock`: one lock per shard (so no shard is
fetched twice) and one on the folder while space is counted and files evicted. The kernel releases
them when a process dies; a fetch it left half done is found and removed by the next one.
The cache only ever writes inside its folder; it never modifies or deletes anything at the source.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from datapipe.common.object_store import LocalWriteError, ObjectChanged, RemoteFolder, StorageError
from datapipe.common.shard_io import read_dali_index, sha256_file

log = logging.getLogger("datapipe")
FOLDER_LOCK = ".lock"
MARKER = ".harmony-shard-cache"  # a folder without it is not a cache: nothing in it is ever deleted
CACHED_FILE = re.compile(r"^[0-9a-f]{12}-.+\.(tar|idx)$")
WAIT_FOR_ROOM_S = 120  # a reader waits this long for other processes' fetches to finish before giving up
PREFETCH_THREADS = 2
PREFETCH_IDLE_EXIT_S = 10  # a prefetch thread not woken by a reader for this long ends (advance() starts anew)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ShardRefused(StorageError):
    """A shard whose bytes differ from the manifest twice in a row."""


@dataclass(frozen=True)
class RemoteShard:
    """One shard of a remote set, as its manifest and the bucket listing describe it."""

    remote: RemoteFolder  # the folder holding it
    stem: str  # the cache's name for it: <source>-<tar stem>
    tar_name: str
    tar_bytes: int
    sha256: str
    index_name: str
    index_bytes: int
    samples: int

    @property
    def total_bytes(self):
        return self.tar_bytes + self.index_bytes


def source_id(location):
    return hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:12]


@contextlib.contextmanager
def _flock(path, blocking=True):
    """Hold an exclusive flock on `path`; yields False (holding nothing) when not blocking and it is taken."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardCache:
    """The cache of the remote shards a loader reads, in `folder`, holding at most `limit_bytes` of shards (of
    every set). `shards[n]` is shard number n of the loader's set or mixture, None for a local one."""

    def __init__(self, folder, limit_bytes, shards: list[RemoteShard | None]):
        self.folder, self.limit_bytes = Path(folder), int(limit_bytes)
        self.shards = shards
        self._make_folder()
        if not (self.folder / MARKER).exists():
            if any(self.folder.iterdir()):
                raise StorageError(f"data.cache_dir={self.folder} holds files and is not a shard cache; the cache "
                                   f"evicts files in its folder, so give it an empty or new folder")
            (self.folder / MARKER).write_text("harmony-pipe shard cache: files here are evicted as needed\n")
        self._number_of = {shard.stem: number for number, shard in enumerate(shards) if shard is not None}
        self._init_process_state()

    def _make_folder(self):
        if self.folder.exists() and not self.folder.is_dir():
            raise StorageError(f"data.cache_dir={self.folder} is a file, not a folder; point data.cache_dir at a "
                               f"folder (a new one, or a shard cache)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"data.cache_dir={self.folder}: cannot make the folder ({error.strerror}: "
                               f"{error.filename}); point data.cache_dir at a folder this user can write") from None

    def _init_process_state(self):
        self.schedule = None
        self._threads, self._claimed, self._state_lock = [], set(), threading.Lock()
        self._wake = threading.Event()
        self.fetched_bytes = 0  # by this process
        self._checked = set()  # versions (_version) of the cached shards this process found matching the manifest

    def __getstate__(self):  # DataLoader workers start their own threads
        return {name: value for name, value in self.__dict__.items() if name in ("folder", "limit_bytes", "shards",
                                                                                   "_number_of", "schedule")}

    def __setstate__(self, state):
        schedule = state.pop("schedule")
        self.__dict__.update(state)
        self._init_process_state()
        self.schedule = schedule

    # What the loader calls.

    def follow(self, schedule):
        """Prefetch by `schedule` (a ShardSchedule) from now on; refuses a limit one batch's shards exceed."""
        needed = schedule.peak_bytes([shard.total_bytes if shard else 0 for shard in self.shards])
        if needed > self.limit_bytes:
            locations = sorted({shard.remote.location for shard in self.shards if shard})
            raise StorageError(f"{', '.join(locations)}: data.cache_limit_gb={self.limit_bytes / 1e9:.6g} is smaller "
                               f"than the {needed / 1e9:.6g} GB of shards one shuffle window reads; raise "
                               f"data.cache_limit_gb or lower data.shuffle_window")
        self.schedule = schedule

    def advance(self, position):
        """The reader is at global sequence `position`: start fetching what comes next."""
        self.schedule.advance(position)
        self._wake.set()
        with self._state_lock:
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < PREFETCH_THREADS:
                thread = threading.Thread(target=self._prefetch, daemon=True, name="shard-prefetch")
                thread.start()
                self._threads.append(thread)

    def paths(self, number):
        """(tar path, index path) of shard `number` in the cache, fetched now if missing."""
        started = time.monotonic()
        while not self._ensure(number, demand=True):
            if time.monotonic() - started > WAIT_FOR_ROOM_S:
                raise StorageError(f"{self.folder}: no room for {self.shards[number].tar_name} after "
                                   f"{WAIT_FOR_ROOM_S} s: other processes' shards fill data.cache_limit_gb="
                                   f"{self.limit_bytes / 1e9:g}; raise it")
            time.sleep(0.1)
        return self._paths(self.shards[number])

    # Fetching.

    def _paths(self, shard):
        return self.folder / f"{shard.stem}.tar", self.folder / f"{shard.stem}.idx"

    def _version(self, shard):
        """What tells a cached shard's files from other files at their paths; None when one is missing."""
        try:
            stats = [path.stat() for path in self._paths(shard)]
        except FileNotFoundError:
            return None
        return shard.stem, *((stat.st_ino, stat.st_size, stat.st_mtime_ns) for stat in stats)

    def _cached_intact(self, shard):
        """Whether the shard is cached and matches its manifest; hashed once per process and file version."""
        version = self._version(shard)
        if version is None:
            return False
        if version in self._checked:
            return True
        tar_path, index_path = self._paths(shard)
        try:
            problem = self._problem(shard, tar_path, sha256_file(tar_path), index_path)
        except FileNotFoundError:  # evicted by another process meanwhile
            return False
        if problem is not None:
            log.warning("%s: its cached copy %s: %s; fetching it again", shard.remote.url(shard.tar_name), tar_path,
                        problem)
            return False
        self._checked.add(version)
        return True

    def _ensure(self, number, demand):
        """Fetch shard `number` unless cached intact; False when there is no room for it (now)."""
        shard = self.shards[number]
        if self._version(shard) in self._checked:
            return True
        with _flock(self.folder / f"{shard.stem}.lock"):
            if self._cached_intact(shard):  # checked now, or another process fetched it while we waited
                return True
            self._remove(self._paths(shard))  # a damaged copy, if any
            with _flock(self.folder / FOLDER_LOCK):
                if not self._make_room(shard.total_bytes, self.schedule.next_use(number) if self.schedule else 0):
                    return False
                self._write_in_folder(shard, f"{shard.stem}.reserved", str(shard.total_bytes))
            try:
                self._fetch(shard)
            finally:
                (self.folder / f"{shard.stem}.reserved").unlink(missing_ok=True)
        if not demand:
            log.debug("prefetched %s", shard.tar_name)
        return True

    def _write_in_folder(self, shard, name, text):
        try:
            (self.folder / name).write_text(text)
        except OSError as error:
            (self.folder / name).unlink(missing_ok=True)
            if error.errno in DISK_FULL:
                raise self._disk_full(shard) from None
            raise

    def _disk_full(self, shard):
        free_bytes = shutil.disk_usage(self.folder).free
        return StorageError(f"data.cache_dir={self.folder}: its disk is full: {shard.tar_name} of "
                            f"{shard.remote.location} needs {shard.total_bytes} bytes and {free_bytes} bytes are "
                            f"free; give data.cache_dir a larger disk, or lower data.cache_limit_gb (now "
                            f"{self.limit_bytes / 1e9:g}) to what its disk holds, or point data.cache_dir at another "
                            f"folder")

    def _fetch(self, shard):
        """Fetch the shard into place, checked against the manifest; leaves no .partial file whatever happens."""
        tar_path, index_path = self._paths(shard)
        partials = [path.with_name(path.name + ".partial") for path in (tar_path, index_path)]
        try:
            self._fetch_checked(shard, *partials)
        except LocalWriteError as error:
            self._remove(partials)  # before the free space is counted
            raise self._local_write_failed(shard, error) from None
        finally:
            self._remove(partials)  # after any failure (a fetched shard's are renamed)
        version = self._version(shard)
        if version is not None:
            self._checked.add(version)

    @staticmethod
    def _remove(paths):
        for path in paths:
            path.unlink(missing_ok=True)

    def _local_write_failed(self, shard, error):
        if error.errno in DISK_FULL:
            return self._disk_full(shard)
        return StorageError(f"data.cache_dir={self.folder}: cannot write {error.filename} ({error.strerror}); point "
                            f"data.cache_dir at a folder this user can write")

    def _download(self, shard, partial_tar, partial_index):
        """Download the shard's tar and index to the partial paths; what is wrong with them, or None."""
        try:
            digest = shard.remote.download(shard.tar_name, partial_tar)
            shard.remote.download(shard.index_name, partial_index)
        except ObjectChanged:
            return "the object was replaced while it was read"
        self.fetched_bytes += shard.total_bytes
        return self._problem(shard, partial_tar, digest, partial_index)

    def _fetch_checked(self, shard, partial_tar, partial_index):
        tar_path, index_path = self._paths(shard)
        for attempt in (1, 2):
            problem = self._download(shard, partial_tar, partial_index)
            if problem is None:
                os.replace(partial_index, index_path)
                os.replace(partial_tar, tar_path)  # the tar last: both present means complete
                return
            if attempt == 2:
                raise ShardRefused(f"{shard.remote.url(shard.tar_name)}: {problem}, fetched twice; the object differs "
                                   f"from its manifest: rebuild or re-publish the shards (`make shards OUT=...`)")
            log.warning("%s: %s; fetching it once more", shard.remote.url(shard.tar_name), problem)

    @staticmethod
    def _problem(shard, tar_path, digest, index_path):
        size = tar_path.stat().st_size
        if size != shard.tar_bytes:
            return f"{size} bytes, the manifest says {shard.tar_bytes}"
        if digest != shard.sha256:
            return "its sha256 differs from the manifest's"
        try:
            entries = read_dali_index(index_path)
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            return f"its index {shard.index_name} does not parse ({error})"
        ends = [offset + length for _, components in entries for offset, length in components.values()]
        if len(entries) != shard.samples or max(ends, default=0) > size:
            return f"its index {shard.index_name} does not describe this tar"
        return None

    # Room.

    def _make_room(self, needed_bytes, next_use):
        """Evict cached shards read later than `next_use` (farthest first) until `needed_bytes` fit; holding the
        folder lock. False if they cannot fit yet."""
        used, cached = 0, {}
        for path in self.folder.iterdir():
            stem, _, extension = path.name.rpartition(".")
            if CACHED_FILE.match(path.name):
                size = path.stat().st_size
                used += size
                cached[stem] = cached.get(stem, 0) + size
            elif extension == "reserved":
                with _flock(self.folder / f"{stem}.lock", blocking=False) as free:
                    if free:  # its fetcher died: remove what it left
                        for leftover in (path, *self.folder.glob(f"{stem}.*.partial")):
                            leftover.unlink(missing_ok=True)
                        continue
                used += int(path.read_text() or 0)
        if used + needed_bytes <= self.limit_bytes:
            return True
        farthest_first = sorted(cached, key=self._next_use_of, reverse=True)
        for stem in farthest_first:
            if self._next_use_of(stem) <= next_use or used + needed_bytes <= self.limit_bytes:
                break
            for extension in ("tar", "idx"):
                (self.folder / f"{stem}.{extension}").unlink(missing_ok=True)
            used -= cached[stem]
            log.debug("evicted %s (next read %s windows away)", stem, self._next_use_of(stem))
        return used + needed_bytes <= self.limit_bytes

    def _next_use_of(self, stem):
        number = self._number_of.get(stem)
        if number is None or self.schedule is None:
            return math.inf  # another set's shard: this run does not read it
        return self.schedule.next_use(number)

    def _prefetch(self):
        """Fetch the upcoming shards in order, while they fit; wait for the reader to move on."""
        while self._wake.wait(timeout=PREFETCH_IDLE_EXIT_S):
            self._wake.clear()
            ahead_bytes = 0
            for number in self.schedule.upcoming():
                if self.shards[number] is None:  # a local shard
                    continue
                ahead_bytes += self.shards[number].total_bytes
                if ahead_bytes > self.limit_bytes:  # the cache cannot hold more of what comes next
                    break
                with self._state_lock:
                    if number in self._claimed:
                        continue
                    self._claimed.add(number)
                try:
                    fitted = self._ensure(number, demand=False)
                except Exception as error:  # noqa: BLE001 (the reader meets it again when it needs this shard)
                    log.warning("prefetch of %s failed: %s", self.shards[number].tar_name, error)
                    fitted = False
                finally:
                    with self._state_lock:
                        self._claimed.discard(number)
                if not fitted:
                    break
