"""`make bench-scale N=...`: how `make shards` and the loader grow with the number of samples.

Generates CC3M-like raw shards in img2dataset's output format (unique JPEGs of 384 px on the
short side at about 30-40 KB, captions of CC3M's length, a few percent failed downloads and bad
samples), then measures, each build in a fresh output folder:
- `make shards` samples/s at 1 and at 2 processes (per core), and at 2 processes without near-duplicate
  removal (`--near-duplicate-bits -1`: no perceptual hashes, no search) side by side;
- peak RSS of the build's main process (which holds the de-duplication table) at N/4 and at N, whose
  difference per sample is what memory grows by; and of its largest worker (one raw shard at a time);
- peak bytes in the output folder against the raw bytes and the final training shards;
- one loader epoch over the result (DALI on CPU threads, SingleCrop 224 px): samples/s and RSS.
Writes <out>/scale.json and scale.png; the report adds a BENCHMARKS.md section, and the README's
table extrapolates to CC3M and CC12M.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datapipe.common import shard_io
from datapipe.common.process_pool import ProcessPool

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SAMPLES_PER_RAW_SHARD = 10000
FAILED_DOWNLOADS = 0.2  # CC3M: 70-85% of urls still resolve
WORDS = np.array(["a", "the", "of", "in", "on", "with", "and", "man", "woman", "dog", "city", "street", "view", "old",
                  "new", "red", "blue", "small", "large", "beautiful", "young", "people", "car", "house", "tree",
                  "water", "sky", "sunset", "beach", "mountain", "building", "night", "light", "portrait", "player",
                  "game", "team", "actor", "artist", "illustration", "vector", "background", "pattern", "flowers",
                  "garden", "table", "food"])


def photo(rng, key):
    """A unique 384 px JPEG of about 30-40 KB: smooth colour fields with fine texture, like a photo."""
    height, width = 384, int(rng.choice([384, 512, 576]))
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    image += rng.integers(-12, 13, image.shape, dtype=np.int16)  # texture: what makes photos 30-40 KB
    image[:2, :64] = np.frombuffer(key.encode().ljust(64 * 6, b"\0")[:64 * 6], dtype=np.uint8).reshape(2, 64, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def caption(rng):
    return " ".join(rng.choice(WORDS, size=max(3, int(rng.normal(10, 4)))))


def write_raw_shard(raw_dir, shard_id, samples, seed):
    """One img2dataset shard: tar (jpg, txt, json), parquet (every url with its status), stats."""
    rng = np.random.default_rng([seed, shard_id])
    tar_samples, rows = [], []
    for index in range(samples):
        key = f"{shard_id:05d}{index:04d}"
        url = f"http://example.invalid/{key}.jpg"
        if rng.random() < FAILED_DOWNLOADS:
            rows.append(dict(key=key, url=url, status="failed_to_download", error_message="HTTP Error 404"))
            continue
        jpeg, text = photo(rng, key), caption(rng)
        kind = rng.random()
        if kind < 0.01:
            jpeg = jpeg[:len(jpeg) // 3]  # truncated: undecodable
        elif kind < 0.015:
            text = " "  # empty caption
        elif kind < 0.025 and tar_samples:
            jpeg = tar_samples[-1]["jpg"]  # an exact duplicate
        tar_samples.append({"__key__": key, "jpg": jpeg, "txt": text.encode(),
                            "json": json.dumps({"url": url, "key": key, "caption": text}).encode()})
        rows.append(dict(key=key, url=url, status="success", error_message=None))
    shard_io.write_tar(raw_dir / f"{shard_id:05d}.tar", tar_samples)
    pq.write_table(pa.Table.from_pylist(rows), raw_dir / f"{shard_id:05d}.parquet")
    stats = dict(count=len(rows), successes=len(tar_samples), failed_to_download=len(rows) - len(tar_samples))
    (raw_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats))


def generate(raw_dir, rows, processes, seed=0):
    """Raw shards holding `rows` url-list rows (about 80% of them downloaded)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    sizes = [min(SAMPLES_PER_RAW_SHARD, rows - start) for start in range(0, rows, SAMPLES_PER_RAW_SHARD)]
    with ProcessPool(processes) as pool:
        list(pool.map(write_raw_shard, itertools.repeat(raw_dir), range(len(sizes)), sizes, itertools.repeat(seed)))
    return sum(path.stat().st_size for path in raw_dir.glob("*.tar"))


def rss_bytes(pid):
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
        return 0


def worker_pids(pid):
    """The process's descendants (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        try:
            children = [int(child) for child in Path(f"/proc/{pending.pop()}/task").glob("*/children")
                        for child in child.read_text().split()]
        except OSError:
            continue
        found += children
        pending += children
    return found


def folder_bytes(folder):
    """Bytes of the files under `folder` (0 if it does not exist yet)."""
    total = 0
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a .partial renamed while we look
            total += path.stat().st_size if path.is_file() else 0
    return total


def measured(command, watch_folder=None, interval_s=0.25):
    """Run `command`; returns (seconds, peaks): peak RSS of the process itself (`main_rss`), of its largest
    worker (`worker_rss`), and peak bytes in `watch_folder` (`disk`)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"main_rss": 0, "worker_rss": 0, "disk": 0}

    def sample():
        while process.poll() is None:
            peaks["main_rss"] = max(peaks["main_rss"], rss_bytes(process.pid))
            peaks["worker_rss"] = max([peaks["worker_rss"], *map(rss_bytes, worker_pids(process.pid))])
            if watch_folder:
                peaks["disk"] = max(peaks["disk"], folder_bytes(watch_folder))
            time.sleep(interval_s)

    watcher = threading.Thread(target=sample)
    watcher.start()
    _, errors = process.communicate()
    watcher.join()
    if process.returncode:
        raise SystemExit(f"bench-scale: {' '.join(command[:4])} failed:\n{errors[-2000:]}")
    return time.perf_counter() - started, peaks


def build(raw_dir, out_dir, processes, options=()):
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds, peaks = measured([sys.executable, "-m", "datapipe.shards", "build", str(raw_dir), str(out_dir),
                               "--processes", str(processes), *options], watch_folder=out_dir)
    result = json.loads((out_dir / "manifest.json").read_text())
    return dict(processes=processes, seconds=round(seconds, 1), samples_in_raw=result["reconciliation"]["in_raw"],
                samples_per_s=round(result["reconciliation"]["in_raw"] / seconds, 1),
                peak_rss_bytes=peaks["main_rss"], peak_worker_rss_bytes=peaks["worker_rss"],
                peak_output_bytes=peaks["disk"], final_bytes=folder_bytes(out_dir),
                shard_bytes=result["totals"]["bytes"], kept=result["totals"]["samples"])


TRACED_BUILD = """
import json, sys, tracemalloc
from datapipe import shards
tracemalloc.start()
shards.build(sys.argv[1], sys.argv[2], processes=2)
print(json.dumps({"traced_peak_bytes": tracemalloc.get_traced_memory()[1]}))
"""


def traced_heap_peak(raw_dir, out_dir):
    """Peak of the build's main-process heap (Python objects and numpy arrays, as tracemalloc counts them):
    what it holds for the data, without the allocator's and the imports' noise that RSS carries."""
    shutil.rmtree(out_dir, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", TRACED_BUILD, str(raw_dir), str(out_dir)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["traced_peak_bytes"]


LOADER_EPOCH = """
import json, resource, sys, time
from datapipe import SingleCrop, make_loader
loader = make_loader(sys.argv[1], SingleCrop(size_px=224), 256, backend="dali", device="cpu", num_workers=2)
started, samples = time.perf_counter(), 0
for batch in loader:
    samples += len(batch.keys)
seconds = time.perf_counter() - started
print(json.dumps({"samples": samples, "seconds": round(seconds, 1), "samples_per_s": round(samples / seconds, 1),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def loader_epoch(train_dir):
    done = subprocess.run([sys.executable, "-c", LOADER_EPOCH, str(train_dir)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rows, out, work_root=None):
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=work_root))
    try:
        small_rows = max(rows // 4, SAMPLES_PER_RAW_SHARD)
        small_raw_bytes = generate(root / "small" / "raw", small_rows, processes=2)
        raw_bytes = generate(root / "large" / "raw", rows, processes=2)
        small = build(root / "small" / "raw", root / "small" / "train", processes=2)
        small["traced_heap_peak_bytes"] = traced_heap_peak(root / "small" / "raw", root / "small" / "train")
        one = build(root / "large" / "raw", root / "large" / "train", processes=1)
        without_near = build(root / "large" / "raw", root / "large" / "train", processes=2,
                             options=("--near-duplicate-bits", "-1"))  # make shards before near duplicates
        two = build(root / "large" / "raw", root / "large" / "train", processes=2)
        two["traced_heap_peak_bytes"] = traced_heap_peak(root / "large" / "raw", root / "large" / "train")
        epoch = loader_epoch(root / "large" / "train")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    added = two["samples_in_raw"] - small["samples_in_raw"]
    growth = (two["peak_rss_bytes"] - small["peak_rss_bytes"]) / added
    heap_growth = (two["traced_heap_peak_bytes"] - small["traced_heap_peak_bytes"]) / added
    result = dict(
        url_list_rows=rows, raw_bytes=raw_bytes, small=dict(url_list_rows=small_rows, raw_bytes=small_raw_bytes,
                                                            **small),
        one_process=one, two_processes=two, two_processes_without_near_duplicates=without_near, loader_epoch=epoch,
        near_duplicates_time_ratio=round(two["seconds"] / without_near["seconds"], 3),
        samples_per_s_per_core_1_process=one["samples_per_s"],
        samples_per_s_per_core_2_processes=round(two["samples_per_s"] / 2, 1),
        rss_growth_bytes_per_sample=round(growth, 1),
        heap_growth_bytes_per_sample=round(heap_growth, 1),
        peak_output_vs_final_shards=round(two["peak_output_bytes"] / two["shard_bytes"], 3),
        left_in_output_vs_final_shards=round(two["final_bytes"] / two["shard_bytes"], 3),
        mean_jpeg_bytes=round(raw_bytes / two["samples_in_raw"]),
        note="peak_output is the output folder's bytes at its largest during the build (raw/ is not counted): "
             "the goal is <= 1.1x the final training shards; rss_growth is the main process's (peak RSS at N - at "
             "N/4) per sample, sampled every 0.25 s, and carries the allocator's and late imports' noise of tens of "
             "MB; heap_growth is the same for its traced heap peak (tracemalloc), the data it holds",
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "scale.png")
    return result


def plot(result, path):
    figure, (speed, memory, disk) = plt.subplots(1, 3, figsize=(11, 3.2))
    speed.bar(["1 process", "2 processes"], [result["samples_per_s_per_core_1_process"],
                                             result["samples_per_s_per_core_2_processes"]], color="#3b75af")
    speed.set_title("make shards, samples/s per core", fontsize=9)
    sizes = [result["small"]["samples_in_raw"], result["two_processes"]["samples_in_raw"]]
    memory.plot(sizes, [result["small"]["peak_rss_bytes"] / 2**20, result["two_processes"]["peak_rss_bytes"] / 2**20],
                marker="o")
    memory.set_title(f"main RSS (MiB); heap +{result['heap_growth_bytes_per_sample']:.0f} B/sample", fontsize=9)
    memory.set_xlabel("samples")
    two = result["two_processes"]
    disk.bar(["raw", "final shards", "output peak"], [result["raw_bytes"] / 2**30, two["shard_bytes"] / 2**30,
                                                       two["peak_output_bytes"] / 2**30], color="#6a9fd4")
    disk.set_title(f"disk (GiB): peak output {result['peak_output_vs_final_shards']:.2f}x final", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60000, help="url-list rows to generate (about 80%% downloaded)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--work-dir", help="where the generated shards go (default: the system's temp folder)")
    args = parser.parse_args(argv)
    result = run(args.rows, args.out, args.work_dir)
    print(f"bench scale: {result['two_processes']['samples_in_raw']} samples: make shards "
          f"{result['samples_per_s_per_core_1_process']:.0f} samples/s per core on 1 process, "
          f"{result['samples_per_s_per_core_2_processes']:.0f} on 2; main heap "
          f"+{result['heap_growth_bytes_per_sample']:.0f} bytes per sample (RSS "
          f"+{result['rss_growth_bytes_per_sample']:.0f}); output peak {result['peak_output_vs_final_shards']:.2f}x "
          f"the final shards, {result['left_in_output_vs_final_shards']:.3f}x left after; loader "
          f"{result['loader_epoch']['samples_per_s']:.0f} samples/s; written to {Path(args.out) / 'scale.json'}")


if __name__ == "__main__":
    main()
