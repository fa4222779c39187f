"""`make bench-data`: samples/s of every view recipe on the DALI backend against the torch reference.

Same shards, same recipe, same CPU budget (DALI threads = DataLoader workers), side by side in one
run; the ratio is the figure to quote. Recipes: Harmony's multi-crop (2 x 224 px + 8 x 96 px, iBOT
masks), plain CLIP's single crop, SLIP (3 x 224 px), CLIP 🚀 (3 x 224 px and 3 augmented captions)
and A-CLIP (2 online crops, the enclosing crop and boxes). The text chain's cost per caption
(augmentation, then tokenization) is measured on the shards' own captions. With a CUDA device,
DALI GPU (`mixed` decode) is measured too for multi-crop, plus the data-wait fraction of a
consumer that spends a fixed time per batch. Writes <out>/datapipe.json and .png.
"""

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import tqdm

from datapipe import MultiCrop, SingleCrop, aclip_views, clip_rocket_views, make_loader, slip_views
from datapipe.common.captions import tokenize
from datapipe.load.caption_views import augment_caption, is_stop_word
from datapipe.load.recipes import STRONG_TEXT
from datapipe.load.samples import SampleReader, ShardSet

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Stop words in NLTK's list that ours lacks: these stay in captions (README, text views).
AUXILIARY_VERBS = {"is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did"}
RECIPES = {"MultiCrop": MultiCrop(), "SingleCrop": SingleCrop(), "SLIP": slip_views(),
           "CLIP-rocket": clip_rocket_views(), "A-CLIP": aclip_views()}


def samples_per_s(train_dir, recipe, backend, workers, batch_size, batches, device="cpu", consume_s=0.0):
    """(samples/s, fraction of the time spent waiting for data) over `batches` timed batches. Each epoch's first
    batch (pipeline build, worker start) is not timed; more batches than an epoch holds run over several."""
    loader = make_loader(train_dir, recipe, batch_size, backend=backend, num_workers=workers, device=device,
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
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="the recipes to measure (the text chain's cost is measured with CLIP-rocket's)")
    args = parser.parse_args(argv)
    train_dir = Path(args.shards)
    if not (train_dir / "manifest.json").is_file():
        raise SystemExit(f"{train_dir}/manifest.json not found: run `make shards` first")
    result = dict(machine=dict(platform=platform.platform(), python=platform.python_version(),
                               cpu_count=torch.get_num_threads(), torch=torch.__version__,
                               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None),
                  shards=str(train_dir), batch_size=args.batch_size,
                  workers_or_threads=args.workers)
    recipes = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        rates = {backend: samples_per_s(train_dir, recipe, backend, args.workers, args.batch_size, args.batches)[0]
                 for backend in ("dali", "torch")}
        recipes[name] = dict(dali_cpu_samples_per_s=round(rates["dali"], 1),
                             torch_reference_samples_per_s=round(rates["torch"], 1),
                             dali_cpu_vs_torch_reference=round(rates["dali"] / rates["torch"], 2))
        print(f"bench datapipe: {name}: DALI CPU {rates['dali']:.0f}/s, torch {rates['torch']:.0f}/s")
    result["recipes"] = recipes
    if "CLIP-rocket" in recipes:
        result["text_chain_us_per_caption"] = text_chain_cost(train_dir)
    if torch.cuda.is_available() and "MultiCrop" in recipes:
        multicrop = recipes["MultiCrop"]
        multicrop["dali_gpu_samples_per_s"] = round(samples_per_s(
            train_dir, MultiCrop(), "dali", args.workers, args.batch_size, args.batches, "cuda")[0], 1)
        # A consumer at 400 samples/s (a Harmony ViT-B step rate per GPU): how much of its time is data wait?
        _, wait = samples_per_s(train_dir, MultiCrop(), "dali", args.workers, args.batch_size, args.batches, "cuda",
                                consume_s=args.batch_size / 400)
        multicrop["dali_gpu_data_wait_fraction_at_400_samples_per_s"] = round(wait, 3)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "datapipe.json").write_text(json.dumps(result, indent=2))
    plot(recipes, args.workers, out_dir / "datapipe.png")
    ratios = ", ".join(f"{name} {row['dali_cpu_vs_torch_reference']:.2f}x" for name, row in recipes.items())
    text = result.get("text_chain_us_per_caption")
    text_cost = (f"; text chain {text['augment']:.0f} + {text['tokenize']:.0f} us per caption (augment + tokenize)"
                 if text else "")
    print(f"bench datapipe: DALI CPU / torch: {ratios}{text_cost}; written to {out_dir / 'datapipe.json'} and "
          "datapipe.png")


def text_chain_cost(train_dir, captions=500):
    """Microseconds per caption of the strong text view's chain and of tokenizing its output, one core."""
    shards = ShardSet.from_path(train_dir)
    reader = SampleReader(shards)
    texts = [reader.read_caption(0, number) for number in range(min(captions, shards.sizes[0]))]
    augment_caption(texts[0], STRONG_TEXT, np.random.default_rng(0))  # loads WordNet
    tokenize(texts[:1])  # loads the BPE vocabulary
    started = time.perf_counter()
    augmented = [augment_caption(caption, STRONG_TEXT, np.random.default_rng([seed, 1000]))
                 for seed, caption in enumerate(tqdm.tqdm(texts, desc="text chain", leave=False))]
    augment_s = time.perf_counter() - started
    started = time.perf_counter()
    tokenize(augmented)
    tokenize_s = time.perf_counter() - started
    words = [word for caption in texts for word in caption.split()]
    removed = sum(is_stop_word(word) for word in words)
    auxiliaries = sum(word.lower() in AUXILIARY_VERBS for word in words)
    return dict(captions=len(texts), augment=round(augment_s / len(texts) * 1e6, 1),
                tokenize=round(tokenize_s / len(texts) * 1e6, 1),
                stop_word_share=round(removed / len(words), 3), auxiliary_verb_share=round(auxiliaries / len(words), 3))


def plot(recipes, workers, path):
    figure, axes = plt.subplots(figsize=(7, 3.2))
    rows = np.arange(len(recipes))
    for offset, (key, label, colour) in enumerate((("dali_cpu_samples_per_s", "DALI CPU", "#3b75af"),
                                                   ("torch_reference_samples_per_s", "torch reference", "#999999"))):
        values = [row[key] for row in recipes.values()]
        axes.barh(rows + 0.4 * offset, values, height=0.4, color=colour, label=label)
        for row, value in zip(rows, values, strict=True):
            axes.text(value, row + 0.4 * offset, f" {value:.0f}", va="center", fontsize=8)
    axes.set_yticks(rows + 0.2, list(recipes))
    axes.invert_yaxis()
    axes.set_xlabel(f"samples / s ({workers} threads or workers)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
