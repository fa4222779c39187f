"""`make bench-dedup`: how well `make shards` finds near duplicates, and what it costs.

A generated quality set: photo-like originals (smooth colour fields, shapes, texture), and of each one the
variants the web makes: re-encoded (JPEG quality 50-95), resized (0.5x-2x), cropped a little (up to 10% in
all), brightness-shifted (0.7x-1.3x) and with a small text overlay; plus unrelated images drawn from the same
colours. Written as img2dataset raw shards (originals first in key order, so they are the ones kept) and built
with `make shards` twice side by side: with near-duplicate removal (the default) and without it
(`--near-duplicate-bits -1`, today's build before it existed). Reports, from the rejection log:
- recall per variant kind: the variants dropped as near duplicates of their own original; `eval_edit` (resized
  0.7x-1x and saved at JPEG quality 30-60) is how an evaluation image is edited on its way into a web crawl;
- precision: of all samples dropped as near duplicates, those that match an image of their own group;
- the time of the two builds (pass 1 hashes every image; pass 2 searches the pairs);
- the EXCLUDE curve: with the eval_edit copies as the evaluation set and the rest as training data, recall and
  precision for each --eval-overlap-bits and --eval-overlap-fine-bits (same signatures and confirmation); and
  the same for the demo's shape images, each with an eval_edit copy.
Writes <out>/near_duplicates.json and .png.

    python -m tools.bench.near_duplicates --out runs/bench --originals 300
"""

import argparse
import io
import itertools
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from tqdm import tqdm

import demo.dataset
from datapipe import shards
from datapipe.common import manifest, near_duplicates, shard_io
from datapipe.common.validate import decode_rgb

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VARIANT_KINDS = ("reencode", "resize", "crop", "brightness", "text", "eval_edit")
GOALS = {"reencode": 0.95, "resize": 0.95, "eval_edit": 0.99}  # recall; precision goal: 0.99
PRECISION_GOAL = 0.99
CURVE_HASH_BITS = (8, 10)  # --eval-overlap-bits values the EXCLUDE curve measures
CURVE_FINE_BITS = (32, 40, 48, 56, 64, 72)  # --eval-overlap-fine-bits values


def original(rng, palette):
    """A photo-like RGB image: a smooth field of the palette's colours, a few shapes, blur and grain."""
    width, height = int(rng.integers(240, 480)), int(rng.integers(200, 400))
    field = palette[rng.integers(0, len(palette), (4, 5))].astype(np.uint8)  # (4, 5, 3)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x, y = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
        box = [x, y, x + int(rng.integers(20, width // 2)), y + int(rng.integers(20, height // 2))]
        colour = tuple(int(value) for value in palette[rng.integers(0, len(palette))])
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    pixels = pixels + rng.integers(-8, 9, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def variant(image, kind, rng):
    """The image as the web changes it; returns (image, JPEG quality to save it at)."""
    quality = 90
    if kind == "reencode":
        quality = int(rng.integers(50, 96))
    elif kind == "resize":
        scale = rng.uniform(0.5, 2.0)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    elif kind == "crop":
        total = rng.uniform(0.02, 0.10)  # the share of width and of height cut, split between the two sides
        left, top = rng.uniform(0, total), rng.uniform(0, total)
        image = image.crop((round(image.width * left), round(image.height * top),
                            round(image.width * (1 - total + left)), round(image.height * (1 - total + top))))
    elif kind == "brightness":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    elif kind == "eval_edit":  # an evaluation image edited a little: resized 0.7x-1x, saved at JPEG 30-60
        scale = rng.uniform(0.7, 1.0)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        quality = int(rng.integers(30, 61))
    elif kind == "text":
        image = image.copy()
        ImageDraw.Draw(image).text((int(rng.integers(4, image.width // 2)), int(rng.integers(4, image.height - 20))),
                                   "(c) stock photo 2024 - all rights reserved", fill=(255, 255, 255))
    return image, quality


def jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def quality_set(originals, seed=0):
    """[(JPEG bytes, group, kind)]: originals first, then their variants, then as many unrelated images of the
    same palettes (each its own group)."""
    rng = np.random.default_rng(seed)
    palettes = [rng.integers(0, 256, (3, 3)) for _ in range(originals)]
    images = [original(rng, palette) for palette in palettes]
    items = [(jpeg(image, 90), group, "original") for group, image in enumerate(images)]
    items += [(jpeg(*variant(image, kind, rng)), group, kind)
              for group, image in enumerate(images) for kind in VARIANT_KINDS]
    items += [(jpeg(original(rng, palette), 90), originals + number, "unrelated")
              for number, palette in enumerate(palettes)]
    return items


def shapes_set(count, seed=0):
    """[(JPEG bytes, group, kind)] of the demo's images (one flat shape on a texture, demo/dataset.py) and an
    eval_edit copy of each: a harder case for a perceptual hash than photos, little coarse layout to hold on to."""
    rng, variant_rng = random.Random(seed), np.random.default_rng(seed)
    colors, shapes = list(demo.dataset.COLORS), list(demo.dataset.SHAPES)
    images = [demo.dataset.render_sample(rng, rng.choice(colors), rng.choice(shapes))[0]
              for _ in range(count)]
    return ([(jpeg(image, 90), group, "original") for group, image in enumerate(images)]
            + [(jpeg(*variant(image, "eval_edit", variant_rng)), group, "eval_edit")
               for group, image in enumerate(images)])


def write_raw(raw_dir, items, per_shard=1000):
    """img2dataset raw shards of the quality set; returns {key: (group, kind)}."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    truth = {}
    for shard_id, start in enumerate(range(0, len(items), per_shard)):
        samples, rows = [], []
        for index, (data, group, kind) in enumerate(items[start:start + per_shard]):
            key = f"{shard_id:05d}{index:04d}"
            url = f"http://example.invalid/{key}.jpg"
            samples.append({"__key__": key, "jpg": data, "txt": f"picture {group} {kind}".encode(),
                            "json": json.dumps({"url": url, "key": key}).encode()})
            rows.append(dict(key=key, url=url, status="success", error_message=None))
            truth[key] = (group, kind)
        shard_io.write_tar(raw_dir / f"{shard_id:05d}.tar", samples)
        pq.write_table(pa.Table.from_pylist(rows), raw_dir / f"{shard_id:05d}.parquet")
        (raw_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(rows),
                                                                        "successes": len(rows)}))
    return truth


def scores(rejections, truth):
    """(recall per variant kind, precision, dropped as duplicates) from a build's rejection log. A re-encode at the
    original's quality can give the same pixels: dropped as an exact duplicate, which counts as found."""
    matched = {row["key"]: row["matches"] for row in rejections if row["reason"] in ("duplicate", "near_duplicate")}
    correct = sum(truth[key][0] == truth[other][0] for key, other in matched.items())
    per_kind = Counter(kind for _, kind in truth.values())
    found = Counter(truth[key][1] for key, other in matched.items() if truth[key][0] == truth[other][0])
    recall = {kind: found[kind] / per_kind[kind] for kind in VARIANT_KINDS}
    return recall, (correct / len(matched) if matched else 1.0), len(matched)


def exclude_curve(items):
    """EXCLUDE on the quality set, from the same signatures and confirmation `make shards` uses: the eval_edit
    copies are the evaluation images, everything else the training set. For each (--eval-overlap-bits,
    --eval-overlap-fine-bits): recall (copies that match a training image of their own group) and precision
    (training images dropped that match a copy of their own group, of all dropped)."""
    signatures = [near_duplicates.signature(decode_rgb(data)[0])
                  for data, _, _ in tqdm(items, desc="hash for the EXCLUDE curve", unit="img", leave=False)]
    hashes = np.array([phash for phash, _ in signatures], dtype=np.uint64)
    details = np.stack([np.frombuffer(details, np.uint8) for _, details in signatures])
    groups = np.array([group for _, group, _ in items])
    is_copy = np.array([kind == "eval_edit" for _, _, kind in items])
    copies, training = np.flatnonzero(is_copy), np.flatnonzero(~is_copy)
    distances = np.bitwise_count(hashes[copies][:, None] ^ hashes[training][None, :])  # (copies, training)
    copy, train = np.nonzero(distances <= max(CURVE_HASH_BITS))
    copy, train, bits = copies[copy], training[train], distances[copy, train]
    same_group = groups[copy] == groups[train]
    curve = []
    for hash_bits, fine_bits in itertools.product(CURVE_HASH_BITS, CURVE_FINE_BITS):
        match = (bits <= hash_bits) & near_duplicates.confirmed(details[copy], details[train], fine_bits)
        dropped = np.unique(train[match])
        curve.append({"eval_overlap_bits": hash_bits, "eval_overlap_fine_bits": fine_bits,
                      "recall": len(np.unique(copy[match & same_group])) / len(copies),
                      "precision": len(np.unique(train[match & same_group])) / len(dropped) if len(dropped) else 1.0,
                      "dropped": len(dropped)})
    return curve


def timed_build(raw_dir, out_dir, processes, duplicates):
    started = time.perf_counter()
    shards.build(raw_dir, out_dir, samples_per_shard=1000, processes=processes, duplicates=duplicates)
    return time.perf_counter() - started


def run(originals, processes, out):
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        items = quality_set(originals)
        truth = write_raw(work / "raw", items)
        seconds_without = timed_build(work / "raw", work / "without", processes, shards.DuplicateRules(-1))
        seconds_with = timed_build(work / "raw", work / "with", processes, shards.DuplicateRules())
        recall, precision, dropped = scores(manifest.read_rejected(work / "with" / manifest.REJECTED), truth)
        shutil.rmtree(work / "without")
    curve = exclude_curve(items)
    shapes_curve = exclude_curve(shapes_set(originals))
    result = {"originals": originals, "images": len(truth), "processes": processes,
              "near_duplicate_bits": shards.DuplicateRules().near_duplicate_bits,
              "recall": recall, "precision": precision, "dropped_as_near_duplicates": dropped,
              "build_s_with": seconds_with, "build_s_without": seconds_without,
              "exclude_curve": curve, "exclude_curve_demo_shapes": shapes_curve,
              "time_with_vs_without": seconds_with / seconds_without}
    out.mkdir(parents=True, exist_ok=True)
    (out / "near_duplicates.json").write_text(json.dumps(result, indent=2))
    figure, (axis, curve_axis) = plt.subplots(1, 2, figsize=(11, 3.2))
    axis.bar(list(recall), list(recall.values()), color="#6a9fd4")
    axis.axhline(0.95, color="#b04040", linestyle="--", label="goal for reencode and resize")
    axis.axhline(GOALS["eval_edit"], color="#40a040", linestyle=":", label="goal for eval_edit")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("recall")
    axis.tick_params(axis="x", labelsize=7)
    axis.set_title(f"near duplicates of {originals} originals: precision {precision:.3f}; make shards "
                   f"{result['time_with_vs_without']:.2f}x the time without", fontsize=8)
    axis.legend(fontsize=7)
    for (name, points), hash_bits in itertools.product((("photos", curve), ("demo shapes", shapes_curve)),
                                                       CURVE_HASH_BITS):
        points = [point for point in points if point["eval_overlap_bits"] == hash_bits]
        fine_bits = [point["eval_overlap_fine_bits"] for point in points]
        style = ("-" if hash_bits == CURVE_HASH_BITS[0] else "--") + ("o" if name == "photos" else "^")
        curve_axis.plot(fine_bits, [point["recall"] for point in points], style, color="#6a9fd4",
                        label=f"recall, {name}, bits {hash_bits}")
        curve_axis.plot(fine_bits, [point["precision"] for point in points], style, color="#b04040",
                        label=f"precision, {name}, bits {hash_bits}")
    curve_axis.axvline(shards.DuplicateRules().eval_overlap_fine_bits, color="grey", linewidth=0.8, label="default")
    curve_axis.set_xlabel("--eval-overlap-fine-bits (of 256)")
    curve_axis.set_title("EXCLUDE of eval_edit copies (resized 0.7-1x, JPEG 30-60)", fontsize=8)
    curve_axis.legend(fontsize=5, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "near_duplicates.png", dpi=120)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--originals", type=int, default=300)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(args.originals, args.processes, Path(args.out))
    recall = ", ".join(f"{kind} {value:.3f}" for kind, value in result["recall"].items())
    defaults = shards.DuplicateRules()
    at_default = [next(point for point in result[curve] if (point["eval_overlap_bits"], point[
        "eval_overlap_fine_bits"]) == (defaults.eval_overlap_bits, defaults.eval_overlap_fine_bits))
                  for curve in ("exclude_curve", "exclude_curve_demo_shapes")]
    print(f"bench dedup: {result['images']} images; recall {recall}; precision {result['precision']:.3f} "
          f"({result['dropped_as_near_duplicates']} dropped); make shards with near-duplicate removal = "
          f"{result['time_with_vs_without']:.2f}x without; EXCLUDE of eval_edit copies at the defaults: recall "
          f"{at_default[0]['recall']:.3f}, precision {at_default[0]['precision']:.3f} (photos), recall "
          f"{at_default[1]['recall']:.3f}, precision {at_default[1]['precision']:.3f} (demo shapes); written to "
          f"{Path(args.out) / 'near_duplicates.json'}")


if __name__ == "__main__":
    main()
