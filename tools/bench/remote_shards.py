"""`make bench-data`, object storage: loader samples/s from a loopback S3 server against local shards.

The same shards are read from their local folder, then from a moto S3 server on 127.0.0.1 through an
empty cache (cold: every shard fetched while the epoch runs) and again through the filled cache
(warm), side by side in one run: DALI on CPU threads, SingleCrop 224 px, whole epochs after one
warm-up batch. Then one epoch through a cache limited to 60% of the set, sampling the cache
folder's size every 20 ms for its peak against the limit. Writes <out>/remote_shards.json.
"""

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

import tqdm

from datapipe import SingleCrop, make_loader
from datapipe.load.loader import CacheOptions
from tools.s3_loopback import S3Server

LOCATION = "s3://bench/train"
SHUFFLE_WINDOW = 500  # about one demo shard: the limited cache needs room for a window's shards, not the set's
LIMITED_FRACTION = 0.6  # of the set's bytes: room for the shards a window and the next batch read (3 of 7)


def epoch_samples_per_s(shards, batch_size, threads, cache=None):
    """Samples/s over one epoch after its first batch (pipeline start-up; the cold cache fetches its shards)."""
    loader = make_loader(shards, SingleCrop(), batch_size, backend="dali", num_workers=threads, device="cpu",
                         shuffle_window=SHUFFLE_WINDOW, cache=cache or CacheOptions())
    iterator = iter(loader)
    next(iterator)
    started, samples = time.perf_counter(), 0
    for batch in tqdm.tqdm(iterator, total=len(loader) - 1, desc=str(shards)[-30:], leave=False):
        samples += len(batch.keys)
    return samples / (time.perf_counter() - started)


class FolderPeak:
    """The largest total size of the cache's shard files seen, sampled every 20 ms in a thread."""

    def __init__(self, folder):
        self.folder, self.peak_bytes, self._done = Path(folder), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._done.wait(0.02):
            size = 0
            for path in list(self.folder.glob("*")):
                if path.suffix in (".tar", ".idx", ".partial"):
                    with contextlib.suppress(FileNotFoundError):  # evicted between the listing and the stat
                        size += path.stat().st_size
            self.peak_bytes = max(self.peak_bytes, size)

    def stop(self):
        self._done.set()
        self._thread.join()
        return self.peak_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/demo/train")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    train_dir = Path(args.shards)
    if not (train_dir / "manifest.json").is_file():
        raise SystemExit(f"{train_dir}/manifest.json not found: run `make shards` first")
    set_bytes = sum(path.stat().st_size for path in train_dir.glob("*") if path.suffix in (".tar", ".idx"))
    server = S3Server().start()
    try:
        server.upload_folder(train_dir, LOCATION)
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch:
            cache = CacheOptions(folder=Path(scratch) / "cache", limit_gb=2 * set_bytes / 1e9)
            rates = {"local": epoch_samples_per_s(train_dir, args.batch_size, args.threads),
                     "cold cache": epoch_samples_per_s(LOCATION, args.batch_size, args.threads, cache),
                     "warm cache": epoch_samples_per_s(LOCATION, args.batch_size, args.threads, cache)}
            limited = CacheOptions(folder=Path(scratch) / "limited", limit_gb=LIMITED_FRACTION * set_bytes / 1e9)
            Path(limited.folder).mkdir()
            watch = FolderPeak(limited.folder)
            rates["limited cache"] = epoch_samples_per_s(LOCATION, args.batch_size, args.threads, limited)
            peak_bytes = watch.stop()
    finally:
        server.stop()
    result = dict(shards=str(train_dir), set_bytes=set_bytes, batch_size=args.batch_size, threads=args.threads,
                  recipe="SingleCrop() 224 px, DALI CPU", shuffle_window=SHUFFLE_WINDOW,
                  samples_per_s={label: round(rate, 1) for label, rate in rates.items()},
                  cold_vs_local=round(rates["cold cache"] / rates["local"], 3),
                  warm_vs_local=round(rates["warm cache"] / rates["local"], 3),
                  limited_cache_limit_bytes=limited.limit_bytes, limited_cache_peak_bytes=peak_bytes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "remote_shards.json").write_text(json.dumps(result, indent=2))
    print(f"bench remote shards: local {rates['local']:.0f}/s, cold cache {rates['cold cache']:.0f}/s "
          f"({result['cold_vs_local']:.2f}x), warm cache {rates['warm cache']:.0f}/s "
          f"({result['warm_vs_local']:.2f}x); a cache limited to {limited.limit_bytes / 1e6:.1f} MB peaked at "
          f"{peak_bytes / 1e6:.1f} MB; written to {out_dir / 'remote_shards.json'}")


if __name__ == "__main__":
    main()
