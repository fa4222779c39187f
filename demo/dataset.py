"""The built-in demo set: coloured shapes on textured backgrounds with templated captions.

Deterministic from a seed. It writes, under `root`:
  www/            the files the loopback server serves (train images and the bad entries)
  items.jsonl     one line per url-list entry: path, caption, kind, expected outcome
  heldout/<class>/*.jpg   a labelled split for zero-shot evaluation and the probes' test set (never downloaded)
  heldout/classes.json    class names, and which colour-shape pairs training never shows
  probe_train/<class>/*.jpg   the training split of the linear probe and k-NN
  heldout_pairs/000000.tar    captioned pairs (jpg, txt) never downloaded, for image-text retrieval

Run `python -m demo.dataset --root shards/demo/source` to generate it by hand.
"""

import argparse
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datapipe.common import shard_io

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 180),
    "orange": (240, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES = {"small": (0.25, 0.35), "large": (0.5, 0.7)}  # shape extent as a fraction of the short side
POSITIONS = ("left", "right", "top", "bottom", "center")
TEXTURES = ("plain", "striped", "dotted", "noisy", "checkered")
# Pairs that appear only in the held-out split, to test composition in zero-shot.
UNSEEN_PAIRS = (("purple", "triangle"), ("orange", "ring"), ("green", "cross"), ("yellow", "square"))
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} on the {position}",
    "a photo of a {color} {shape}",
    "{color} {shape}, {size}, {position} of the picture",
    "there is a {size} {shape} in {color} near the {position}",
    "a {color} {shape} on a {texture} background",
)
SIDE_RANGE_PX = (112, 176)
MARKER_FILE = "items.jsonl"
PARAMS_FILE = "params.json"


@dataclass(frozen=True)
class DemoItem:
    path: str  # relative to www/, or a special server path for dead links and errors
    caption: str
    kind: str  # "train" or the name of the bad entry
    expected: str  # "kept", "download_failed", or "rejected:<reason>"


def class_name(color, shape):
    return f"{color} {shape}"


def _background(rng, width_px, height_px, texture):
    base = np.array([rng.randint(90, 200) for _ in range(3)], dtype=np.float32)
    canvas = np.broadcast_to(base, (height_px, width_px, 3)).copy()
    ys, xs = np.mgrid[0:height_px, 0:width_px]
    if texture == "striped":
        period = rng.randint(6, 14)
        canvas[(xs + ys) // period % 2 == 0] *= 0.8
    elif texture == "dotted":
        period = rng.randint(8, 14)
        canvas[(xs % period < 3) & (ys % period < 3)] *= 0.7
    elif texture == "checkered":
        period = rng.randint(10, 20)
        canvas[(xs // period + ys // period) % 2 == 0] *= 0.85
    elif texture == "noisy":
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 18, canvas.shape)
        canvas += noise.astype(np.float32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def _shape_box(rng, width_px, height_px, size, position):
    low, high = SIZES[size]
    extent = int(min(width_px, height_px) * rng.uniform(low, high))
    slack_x, slack_y = width_px - extent, height_px - extent
    anchors = {  # (x, y) of the box's top-left corner as fractions of the slack
        "left": (rng.uniform(0, 0.15), rng.uniform(0.3, 0.7)),
        "right": (rng.uniform(0.85, 1), rng.uniform(0.3, 0.7)),
        "top": (rng.uniform(0.3, 0.7), rng.uniform(0, 0.15)),
        "bottom": (rng.uniform(0.3, 0.7), rng.uniform(0.85, 1)),
        "center": (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)),
    }
    fx, fy = anchors[position]
    x0, y0 = int(fx * slack_x), int(fy * slack_y)
    return x0, y0, x0 + extent, y0 + extent


def _draw_shape(image, box, shape, rgb):
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    extent = x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x0 + extent // 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "cross":
        bar = max(extent // 3, 2)
        mid_x, mid_y = x0 + extent // 2, y0 + extent // 2
        draw.rectangle((mid_x - bar // 2, y0, mid_x + bar // 2, y1), fill=rgb)
        draw.rectangle((x0, mid_y - bar // 2, x1, mid_y + bar // 2), fill=rgb)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(extent // 6, 2))


def render_sample(rng, color, shape):
    """One image and the words that describe it."""
    width_px, height_px = rng.randint(*SIDE_RANGE_PX), rng.randint(*SIDE_RANGE_PX)
    size, position, texture = rng.choice(list(SIZES)), rng.choice(POSITIONS), rng.choice(TEXTURES)
    image = _background(rng, width_px, height_px, texture)
    _draw_shape(image, _shape_box(rng, width_px, height_px, size, position), shape, COLORS[color])
    words = dict(color=color, shape=shape, size=size, position=position, texture=texture)
    return image, words


def _jpeg_bytes(image, **save_kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_kwargs)
    return buffer.getvalue()


def _bad_entries(rng, www):
    """The deliberately bad url-list entries, each with the outcome the pipeline must give it."""
    def sample_image():
        return render_sample(rng, "red", "circle")[0]

    def write(name, data):
        (www / name).write_bytes(data)
        return name

    encoded = io.BytesIO()
    sample_image().convert("RGBA").save(encoded, format="PNG")
    alpha_png = encoded.getvalue()
    encoded = io.BytesIO()
    sample_image().save(encoded, format="GIF")
    gif = encoded.getvalue()
    rotated = Image.new("RGB", (160, 120), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer must rotate 90 degrees clockwise
    duplicate = _jpeg_bytes(sample_image())
    full = _jpeg_bytes(sample_image())
    return [
        DemoItem("missing/nothing-here.jpg", "a red circle", "dead_link", "download_failed"),
        DemoItem("status/500", "a red circle", "server_error", "download_failed"),
        DemoItem(write("page.html", b"<html><body>not an image</body></html>"), "a red circle",
                 "html_page", "download_failed"),
        DemoItem(write("truncated.jpg", full[: len(full) * 2 // 3]), "a red circle",
                 "truncated_jpeg", "download_failed"),  # OpenCV refuses it inside img2dataset
        DemoItem(write("cmyk.jpg", _jpeg_bytes(sample_image().convert("CMYK"))),
                 "a red circle in cmyk", "cmyk_jpeg", "kept"),
        DemoItem(write("gray.jpg", _jpeg_bytes(sample_image().convert("L"))),
                 "a grey circle", "grayscale_jpeg", "kept"),
        DemoItem(write("alpha.png", alpha_png), "a red circle with alpha", "png_alpha", "kept"),
        DemoItem(write("anim.gif", gif), "a red circle as gif", "gif", "kept"),  # img2dataset re-encodes it
        DemoItem(write("rotated.jpg", _jpeg_bytes(rotated, exif=exif.tobytes())),
                 "a red square turned sideways", "exif_rotated", "kept"),
        DemoItem(write("one-pixel.jpg", _jpeg_bytes(Image.new("RGB", (1, 1), (255, 0, 0)))),
                 "a red dot", "one_pixel", "rejected:too_small"),
        DemoItem(write("banner.jpg", _jpeg_bytes(Image.new("RGB", (800, 100), (0, 0, 255)))),
                 "a blue banner", "extreme_aspect", "rejected:aspect_ratio"),
        DemoItem(write("no-caption.jpg", _jpeg_bytes(sample_image())), "   ",
                 "empty_caption", "rejected:empty_caption"),
        DemoItem(write("mojibake.jpg", _jpeg_bytes(sample_image())),
                 "a red circle on a cafÃ© table", "mojibake_caption", "kept"),
        DemoItem(write("dup-a.jpg", duplicate), "a red circle, first copy", "duplicate_first", "kept"),
        DemoItem(write("dup-b.jpg", duplicate), "a red circle, second copy", "duplicate_second",
                 "rejected:duplicate"),
    ]


def _write_class_folders(rng, folder_root, per_class):
    """<folder_root>/<colour_shape>/NNN.jpg for every class, and classes.json."""
    for color in COLORS:
        for shape in SHAPES:
            folder = folder_root / class_name(color, shape).replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                (folder / f"{index:03d}.jpg").write_bytes(_jpeg_bytes(render_sample(rng, color, shape)[0]))
    (folder_root / "classes.json").write_text(json.dumps({
        "classes": [class_name(c, s) for c in COLORS for s in SHAPES],
        "folders": [class_name(c, s).replace(" ", "_") for c in COLORS for s in SHAPES],
        "unseen_in_training": [class_name(c, s) for c, s in UNSEEN_PAIRS],
    }, indent=2))


def _write_retrieval_pairs(rng, folder, count):
    """One WebDataset shard of captioned pairs over every class, seen and unseen."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        image, words = render_sample(rng, rng.choice(list(COLORS)), rng.choice(SHAPES))
        samples.append({"__key__": f"pair{index:06d}", "jpg": _jpeg_bytes(image),
                        "txt": rng.choice(CAPTION_TEMPLATES).format(**words).encode()})
    shard_io.write_tar(folder / "000000.tar", samples)


def generate(root, num_train=3000, heldout_per_class=10, seed=0, probe_per_class=20, heldout_pairs=300):
    """Write the demo set under `root` (see the module docstring); returns the items."""
    root = Path(root)
    www, heldout = root / "www", root / "heldout"
    (www / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in UNSEEN_PAIRS]
    items = []
    for index in range(num_train):
        color, shape = rng.choice(seen_pairs)
        image, words = render_sample(rng, color, shape)
        name = f"img/{index:06d}.jpg"
        (www / name).write_bytes(_jpeg_bytes(image))
        items.append(DemoItem(name, rng.choice(CAPTION_TEMPLATES).format(**words), "train", "kept"))
    bad = _bad_entries(rng, www)
    # Spread the bad entries through the list so they land in different raw shards.
    for offset, item in enumerate(bad):
        items.insert((offset * len(items)) // len(bad), item)
    _write_class_folders(rng, heldout, heldout_per_class)
    _write_class_folders(rng, root / "probe_train", probe_per_class)
    _write_retrieval_pairs(rng, root / "heldout_pairs", heldout_pairs)
    with open(root / MARKER_FILE, "w") as out:
        for item in items:
            out.write(json.dumps(item.__dict__) + "\n")
    params = dict(num_train=num_train, heldout_per_class=heldout_per_class, seed=seed,
                  probe_per_class=probe_per_class, heldout_pairs=heldout_pairs)
    (root / PARAMS_FILE).write_text(json.dumps(params))
    return items


def load_items(root):
    with open(Path(root) / MARKER_FILE) as lines:
        return [DemoItem(**json.loads(line)) for line in lines]


def ensure_generated(root, num_train=3000, heldout_per_class=10, seed=0, probe_per_class=20, heldout_pairs=300):
    """Generate the demo set unless `root` already holds one made with these settings."""
    params = dict(num_train=num_train, heldout_per_class=heldout_per_class, seed=seed,
                  probe_per_class=probe_per_class, heldout_pairs=heldout_pairs)
    params_file = Path(root) / PARAMS_FILE
    if params_file.exists() and json.loads(params_file.read_text()) == params:
        return load_items(root)
    return generate(root, **params)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="shards/demo/source")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--heldout-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-per-class", type=int, default=20)
    parser.add_argument("--heldout-pairs", type=int, default=300)
    args = parser.parse_args()
    items = generate(args.root, args.num_train, args.heldout_per_class, args.seed, args.probe_per_class,
                     args.heldout_pairs)
    bad = sum(item.kind != "train" for item in items)
    print(f"demo set: {len(items)} url-list entries ({bad} deliberately bad) and "
          f"{len(COLORS) * len(SHAPES)} held-out classes written to {args.root}")


if __name__ == "__main__":
    main()
