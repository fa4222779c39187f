"""`make bench-data`: Harmony multi-crop samples/s of the DALI backend against the torch reference.

Same shards, same recipe (MultiCrop defaults: 2 x 224 px + 8 x 96 px, iBOT masks), same CPU
budget (DALI threads = DataLoader workers), side by side in one run; the ratio is the figure
to quote. With a CUDA device, DALI GPU (`mixed` decode) is measured too, plus the data-wait
fraction of a consumer that spends a fixed time per batch. Writes <out>/datapipe.json and .png.
"""

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import matplotlib
import torch
import tqdm

from datapipe import MultiCrop, make_loader

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def samples_per_s(train_dir, backend, workers, batch_size, batches, device="cpu", consume_s=0.0):
    """(samples/s, fraction of the time spent waiting for data) over `batches` timed batches. Each epoch's first
    batch (pipeline build, worker start) is not timed; more batches than an epoch holds run over several."""
    loader = make_loader(train_dir, MultiCrop(), batch_size, backend=backend, num_workers=workers, device=device,
                         dtype=torch.bfloat16 if device == "cuda" else torch.float32, shuffle_window=batch_size * 4)
    waited = elapsed = 0.0
    timed = 0
    with tqdm.tqdm(total=batches, desc=f"{backend} {device}", leave=False) as progress:
        while timed < batches:
            iterator = iter(loader)
            next(iterator)  # start-up of this epoch's pipeline
            started = before = time.perf_counter()
            timed_before = timed
            for _ in itertools.islice(iterator, batches - timed):
                if device == "cuda":
                    torch.cuda.synchronize()
                waited += time.perf_counter() - before
                timed += 1
                progress.update()
                if consume_s:
                    time.sleep(consume_s)  # a training step that does not need the host
                before = time.perf_counter()
            elapsed += time.perf_counter() - started
            if timed == timed_before:
                raise SystemExit(f"{train_dir}: one batch of {batch_size} per epoch; nothing left to time after "
                                 "the start-up batch: use a smaller --batch-size or more shards")
    return timed * batch_size / elapsed, waited / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", default="shards/demo/train", help="built with `make shards` if missing")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args(argv)
    train_dir = Path(args.shards)
    if not (train_dir / "manifest.json").is_file():
        raise SystemExit(f"{train_dir}/manifest.json not found: run `make shards` first")
    result = dict(machine=dict(platform=platform.platform(), python=platform.python_version(),
                               cpu_count=torch.get_num_threads(), torch=torch.__version__,
                               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None),
                  shards=str(train_dir), recipe="MultiCrop() defaults", batch_size=args.batch_size,
                  workers_or_threads=args.workers)
    rates = {}
    for label, backend in (("DALI CPU", "dali"), ("torch reference", "torch")):
        rates[label], _ = samples_per_s(train_dir, backend, args.workers, args.batch_size, args.batches)
    result["dali_cpu_samples_per_s"] = round(rates["DALI CPU"], 1)
    result["torch_reference_samples_per_s"] = round(rates["torch reference"], 1)
    result["dali_cpu_vs_torch_reference"] = round(rates["DALI CPU"] / rates["torch reference"], 2)
    if torch.cuda.is_available():
        rates["DALI GPU"], _ = samples_per_s(train_dir, "dali", args.workers, args.batch_size, args.batches, "cuda")
        result["dali_gpu_samples_per_s"] = round(rates["DALI GPU"], 1)
        # A consumer at 400 samples/s (a Harmony ViT-B step rate per GPU): how much of its time is data wait?
        _, wait = samples_per_s(train_dir, "dali", args.workers, args.batch_size, args.batches, "cuda",
                                consume_s=args.batch_size / 400)
        result["dali_gpu_data_wait_fraction_at_400_samples_per_s"] = round(wait, 3)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "datapipe.json").write_text(json.dumps(result, indent=2))
    figure, axes = plt.subplots(figsize=(6, 2.6))
    axes.barh(list(rates), list(rates.values()), color=["#3b75af", "#999999", "#1f4e79"][:len(rates)])
    for row, value in enumerate(rates.values()):
        axes.text(value, row, f" {value:.0f}", va="center")
    axes.set_xlabel("multi-crop samples / s (2 x 224 + 8 x 96 px)")
    axes.set_title(f"DALI CPU = {result['dali_cpu_vs_torch_reference']:.2f}x the torch reference, "
                   f"{args.workers} threads/workers")
    figure.tight_layout()
    figure.savefig(out_dir / "datapipe.png", dpi=120)
    summary = ", ".join(f"{label} {rate:.0f}/s" for label, rate in rates.items())
    print(f"bench datapipe: {summary}; DALI CPU / torch = {result['dali_cpu_vs_torch_reference']:.2f}x; "
          f"written to {out_dir / 'datapipe.json'} and datapipe.png")


if __name__ == "__main__":
    main()
