"""`make bench-shards`: `make shards` throughput against plain Pillow decoding of the same images.

Both are measured side by side in one run on the same raw shards, one process each, so the
ratio (not the absolute rate) is the figure to quote. Writes <out>/shards.json and shards.png.
"""

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib
from PIL import Image

import demo.download
from datapipe import shards
from datapipe.common import captions, shard_io
from datapipe.common.validate import ImageRules
from datapipe.shards.clean import clean_raw_shard

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pillow_decode_rate(raw_tars):
    """Samples/s of reading the raw shards and decoding every image with Pillow, nothing else."""
    started, count = time.perf_counter(), 0
    for sample in shard_io.read_samples(raw_tars):
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        count += 1
    return count / (time.perf_counter() - started)


def steady_state_rate(raw_tars):
    """Samples/s of pass 1 (decode, validate, convert, clean, tokenize, write) in this process,
    after the one-off start-up (importing open_clip and torch for the tokenizer, about 3 s)."""
    captions.tokenize(["warm up"])
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pass1-"))
    try:
        started = time.perf_counter()
        count = sum(len(clean_raw_shard(t, work_dir, ImageRules()).read_text().splitlines())
                    for t in raw_tars)
        return count / (time.perf_counter() - started)
    finally:
        shutil.rmtree(work_dir)


def shards_rate(raw_dir, processes, repeats):
    """Samples/s of a full `make shards` build (best of `repeats`, fresh output each time)."""
    best = 0.0
    for _ in range(repeats):
        out_dir = Path(tempfile.mkdtemp(prefix="bench-shards-"))
        try:
            started = time.perf_counter()
            result = shards.build(raw_dir, out_dir / "train", samples_per_shard=500, processes=processes)
            best = max(best, result["reconciliation"]["in_raw"] / (time.perf_counter() - started))
        finally:
            shutil.rmtree(out_dir)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", default="shards/demo/raw", help="raw shards (downloaded if missing)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    raw_dir = Path(args.raw)
    if not list(raw_dir.glob("*.tar")):
        demo.download.download_demo(raw_dir, processes=2)
    raw_tars = sorted(raw_dir.glob("*.tar"))
    pillow = max(pillow_decode_rate(raw_tars) for _ in range(args.repeats))
    steady = max(steady_state_rate(raw_tars) for _ in range(args.repeats))
    one_process = shards_rate(raw_dir, 1, args.repeats)
    two_processes = shards_rate(raw_dir, 2, args.repeats)
    result = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), python=platform.python_version()),
        raw=str(raw_dir),
        pillow_decode_samples_per_s_1_core=round(pillow, 1),
        steady_state_samples_per_s_1_core=round(steady, 1),
        steady_state_per_core_vs_pillow_decode=round(steady / pillow, 3),
        make_shards_samples_per_s_1_process=round(one_process, 1),
        make_shards_samples_per_s_2_processes=round(two_processes, 1),
        make_shards_per_core_vs_pillow_decode=round(one_process / pillow, 3),
        scaling_2_processes_vs_1=round(two_processes / one_process, 2),
        note="make shards includes start-up (process pool, tokenizer), validation, caption cleaning, "
             "tokenization, duplicate detection, tar writing, DALI indexes and the manifest",
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shards.json").write_text(json.dumps(result, indent=2))
    figure, axes = plt.subplots(figsize=(6, 3))
    labels = ["Pillow decode\n(1 core)", "shards, steady\n(1 core)", "make shards\n(1 process)",
              "make shards\n(2 processes)"]
    values = [pillow, steady, one_process, two_processes]
    axes.barh(labels, values, color=["#999999", "#6a9fd4", "#3b75af", "#1f4e79"])
    for row, value in enumerate(values):
        axes.text(value, row, f" {value:.0f}", va="center")
    axes.set_xlabel("samples / s")
    axes.set_title(f"make shards per core: {steady / pillow:.2f}x plain decode (steady state)")
    figure.tight_layout()
    figure.savefig(out_dir / "shards.png", dpi=120)
    print(f"bench shards: steady state {steady:.0f} samples/s per core = {steady / pillow:.2f}x plain Pillow "
          f"decode ({pillow:.0f}/s); whole make shards incl. start-up {one_process:.0f}/s on 1 process, "
          f"{two_processes:.0f}/s on 2; "
          f"written to {out_dir / 'shards.json'} and shards.png")


if __name__ == "__main__":
    main()
