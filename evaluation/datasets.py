"""Evaluation sets in the layouts they are distributed in, each read into one form (`EvalSet`).

Classification sets (zero-shot, linear probe, k-NN):
- class folders: `<data>/<class>/*.jpg`, names from the folder names ("_" -> " ") or `<data>/classes.json`
  ({"classes": [...], "folders": [...]}); the demo's held-out split.
- ImageNet-1k synset folders: `<data>/n01440764/*.JPEG`, ... (torchvision's ImageFolder, open_clip's trainer).
  A folder's class is its synset's index among ImageNet-1k's 1000 (timm's sorted list), named by open_clip's
  IMAGENET_CLASSNAMES. With fewer than 1000 folders the classifier holds only the synsets present.
- ImageNet-1k flat folder + label file: `<data>/*.JPEG` and a label file given with `labels=` or found in the
  folder or its parent: `LOC_val_solution.csv` (Kaggle: ImageId,PredictionString, synset first), or
  `val.txt`/`labels.txt` with `<file name> <label>` lines, the label a class index 0-999 (sorted-synset order,
  as Caffe's and timm's val.txt) or a synset. Every image needs a label and every label its image.
- CLIP_benchmark webdataset: `<data>/classnames.txt`, `<data>/zeroshot_classification_templates.txt`,
  `<data>/test/nshards.txt`, `<data>/test/0.tar` ... (samples: webp/png/jpg/jpeg + cls), read in shard order.
Retrieval sets:
- held-out shards: `<data>/*.tar` or `*.tar.zst`, one jpg + txt caption per sample (the demo's held-out pairs,
  or `make shards` on a validation url list).
- CLIP_benchmark webdataset with `dataset_type.txt` = retrieval: `txt` holds the image's captions, one a line.
- Karpathy split JSON: `dataset_coco.json` / `dataset_flickr30k.json` ({"images": [{"filepath"?, "filename",
  "split", "sentences": [{"raw"}]}]}: the `test` split) or the BLIP/LAVIS test files ([{"image", "caption": [...]}]),
  images under `images=` (default: the JSON's folder).
"""

import atexit
import csv
import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo

from datapipe.common import shard_io
from datapipe.common.captions import clean_caption
from datapipe.common.object_store import is_remote
from datapipe.shards.publish import stage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CLIP_BENCHMARK_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
SYNSET = re.compile(r"n\d{8}")
LABEL_FILES = ("LOC_val_solution.csv", "val.txt", "labels.txt")
# Prompt templates as "{}" format strings: open_clip's shipped sets, by name.
TEMPLATE_SETS = {"openai": tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES),
                 "simple": tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES)}
IMAGENET_NAMES_FROM = "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES (open_clip 3.3.0)"
LAYOUTS_HELP = ("class folders <data>/<class>/*.jpg, ImageNet synset folders <data>/n01440764/*.JPEG, a flat "
                "image folder with a label file (LOC_val_solution.csv, val.txt or labels.txt), a CLIP_benchmark "
                "webdataset folder (classnames.txt, test/nshards.txt, test/0.tar), held-out .tar shards (jpg + "
                "txt), or a Karpathy-split JSON with its image folder")


class ShardImage(NamedTuple):
    """An image's encoded bytes read from a shard, and which sample it is (for messages)."""
    data: bytes
    where: str


class LayoutError(ValueError):
    """An evaluation folder or file in none of the known layouts, or inconsistent within its layout."""


@dataclass
class EvalSet:
    """One evaluation set. `samples()` yields (image, target) in the set's order: the image a path or a
    ShardImage, the target a class index (classification) or the image's captions (retrieval). `files` are what the
    content is read from (the feature cache's key); `count` is the number of images when known before reading."""
    kind: str  # "classification" | "retrieval"
    layout: str
    source: Path
    files: list[Path]
    samples: callable
    count: int | None = None
    class_names: list[str] = field(default_factory=list)
    class_names_from: str = ""
    templates: tuple[str, ...] | None = None  # the set's own templates ("{}" strings), if it ships them
    default_templates: str = "simple"
    details: dict = field(default_factory=dict)  # what the result records about the layout

    def describe(self):
        return {"layout": self.layout, "source": str(self.source), **self.details}


def _images_in(folder):
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def _file_samples(samples):
    def read():
        yield from samples
    return read


def _class_folders(data_dir, folders, names, names_from, layout, default_templates, details=None):
    samples = [(path, index) for index, folder in enumerate(folders) for path in _images_in(data_dir / folder)]
    if not samples:
        raise LayoutError(f"{data_dir}: no images in its class folders (expected <data>/<class>/*.jpg)")
    return EvalSet("classification", layout, data_dir, [path for path, _ in samples], _file_samples(samples),
                   len(samples), list(names), names_from, None, default_templates, details or {})


def imagenet_synsets():
    """ImageNet-1k's 1000 synsets in class-index order (sorted, as torchvision and open_clip read them)."""
    return ImageNetInfo("imagenet-1k").label_names()


def _synset_folders(data_dir, folders):
    index = {synset: position for position, synset in enumerate(imagenet_synsets())}
    unknown = [folder for folder in folders if folder not in index]
    if unknown:
        raise LayoutError(f"{data_dir}: {len(unknown)} synset folder(s) are not ImageNet-1k classes (first: "
                          f"{unknown[0]}); zero-shot ImageNet needs the 1000 ILSVRC2012 synsets")
    names = [IMAGENET_CLASSNAMES[index[folder]] for folder in folders]
    return _class_folders(data_dir, folders, names, IMAGENET_NAMES_FROM, "imagenet synset folders", "openai",
                          {"synsets": len(folders), "of_imagenet_synsets": 1000})


def _read_label_file(path):
    """{image stem: synset} from a label file (see the module docstring)."""
    synsets = imagenet_synsets()
    labels = {}
    if path.suffix == ".csv":
        with open(path, newline="") as stream:
            for row in csv.DictReader(stream):
                if "ImageId" not in row or "PredictionString" not in row:
                    raise LayoutError(f"{path}: expected Kaggle's columns ImageId,PredictionString")
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        return labels
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LayoutError(f"{path} line {number}: expected '<image file> <class index or synset>', got "
                              f"{line!r} (the devkit's ILSVRC2012_validation_ground_truth.txt numbers classes in "
                              "another order: use LOC_val_solution.csv or a '<file> <synset>' list)")
        name, label = parts
        if label.isdigit() and int(label) < 1000:
            label = synsets[int(label)]
        if not SYNSET.fullmatch(label):
            raise LayoutError(f"{path} line {number}: label {label!r} is neither a class index 0-999 nor a synset")
        labels[Path(name).stem] = label
    return labels


def _flat_imagenet(data_dir, images, labels_file):
    labels = _read_label_file(labels_file)
    index = {synset: position for position, synset in enumerate(imagenet_synsets())}
    unlabelled = [path.name for path in images if path.stem not in labels]
    if unlabelled:
        raise LayoutError(f"{data_dir}: {len(unlabelled)} image(s) have no label in {labels_file} (first: "
                          f"{unlabelled[0]}); give the label file of these images with labels=FILE")
    missing = sorted(set(labels) - {path.stem for path in images})
    if missing:
        raise LayoutError(f"{labels_file} lists {len(missing)} image(s) not in {data_dir} (first: {missing[0]}); "
                          "the folder is incomplete, or the label file belongs to another set")
    unknown = sorted({labels[path.stem] for path in images} - set(index))
    if unknown:
        raise LayoutError(f"{labels_file}: synset {unknown[0]} is not an ImageNet-1k class")
    samples = [(path, index[labels[path.stem]]) for path in images]
    return EvalSet("classification", "imagenet flat folder + label file", data_dir, [*images, labels_file],
                   _file_samples(samples), len(samples), list(IMAGENET_CLASSNAMES), IMAGENET_NAMES_FROM, None,
                   "openai", {"label_file": str(labels_file)})


def _clip_benchmark_shards(data_dir):
    test = data_dir / "test"
    count_file = test / "nshards.txt"
    if count_file.is_file():
        shards = [test / f"{index}.tar" for index in range(int(count_file.read_text().strip()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise LayoutError(f"{count_file} says {len(shards)} shards but {test} lacks {', '.join(absent[:3])}")
        return shards
    shards = sorted(test.glob("*.tar"), key=lambda path: (len(path.stem), path.stem))  # 0, 1, ..., 10
    if not shards:
        raise LayoutError(f"{test}: no .tar shards (CLIP_benchmark's layout: test/nshards.txt, test/0.tar, ...)")
    return shards


def _clip_benchmark_image(sample, where):
    for key in CLIP_BENCHMARK_IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise LayoutError(f"{where}: no image member ({', '.join(CLIP_BENCHMARK_IMAGE_KEYS)})")


def _clip_benchmark(data_dir):
    shards = _clip_benchmark_shards(data_dir)
    type_file = data_dir / "dataset_type.txt"
    dataset_type = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    metadata = [path for path in (type_file, data_dir / "classnames.txt",
                                  data_dir / "zeroshot_classification_templates.txt") if path.is_file()]
    if dataset_type == "retrieval":
        def read():
            for sample in shard_io.read_samples(shards):
                where = f"{sample['__url__']}: sample {sample['__key__']}"
                if "txt" not in sample:
                    raise LayoutError(f"{where} has no txt member; a retrieval set needs the image's captions")
                yield ShardImage(_clip_benchmark_image(sample, where), where), sample["txt"].decode().splitlines()
        return EvalSet("retrieval", "clip_benchmark webdataset", data_dir, shards + metadata, read)
    if dataset_type != "classification":
        raise LayoutError(f"{type_file}: dataset type {dataset_type!r} is not evaluated here "
                          "(classification and retrieval are)")
    names_file, templates_file = data_dir / "classnames.txt", data_dir / "zeroshot_classification_templates.txt"
    if not names_file.is_file():
        raise LayoutError(f"{names_file} not found: a CLIP_benchmark classification set needs its class names")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    templates = None
    if templates_file.is_file():
        templates = tuple(line.strip().replace("{c}", "{}") for line in templates_file.read_text().splitlines()
                          if line.strip())

    def read():
        for sample in shard_io.read_samples(shards):
            where = f"{sample['__url__']}: sample {sample['__key__']}"
            if "cls" not in sample:
                raise LayoutError(f"{where} has no cls member; a classification set needs each image's class")
            label = int(sample["cls"].decode().strip())
            if not 0 <= label < len(names):
                raise LayoutError(f"{where}: class {label} is outside classnames.txt's {len(names)} names")
            yield ShardImage(_clip_benchmark_image(sample, where), where), label
    return EvalSet("classification", "clip_benchmark webdataset", data_dir, shards + metadata, read, None, names,
                   str(names_file), templates, "simple")


def _held_out_shards(data_dir, shards):
    def read():
        for sample in shard_io.read_samples(shards):
            where = f"{sample['__url__']}: sample {sample['__key__']}"
            if "jpg" not in sample or "txt" not in sample:
                raise LayoutError(f"{where} has no jpg or no txt member; retrieval needs both")
            yield ShardImage(sample["jpg"], where), [clean_caption(sample["txt"].decode("utf-8", errors="replace"))]
    return EvalSet("retrieval", "held-out shards (jpg + txt)", data_dir, shards, read)


def _karpathy(annotation_file, images_dir):
    images_dir = Path(images_dir) if images_dir else annotation_file.parent
    try:
        annotations = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as error:
        raise LayoutError(f"{annotation_file}: not JSON ({error})") from None
    if isinstance(annotations, dict) and "images" in annotations:  # Karpathy's own files
        entries = [(Path(image.get("filepath", "")) / image["filename"], [s["raw"] for s in image["sentences"]])
                   for image in annotations["images"] if image.get("split") == "test"]
        layout = "karpathy split json (test split)"
    elif isinstance(annotations, list) and annotations and "image" in annotations[0]:  # BLIP/LAVIS test files
        entries = [(Path(entry["image"]), entry["caption"] if isinstance(entry["caption"], list)
                    else [entry["caption"]]) for entry in annotations]
        layout = "karpathy split json (BLIP/LAVIS test file)"
    else:
        raise LayoutError(f"{annotation_file}: neither Karpathy's {{'images': [...]}} nor a BLIP/LAVIS list of "
                          "{'image', 'caption'}")
    if not entries:
        raise LayoutError(f"{annotation_file}: no test-split images")
    paths = []
    for relative, _ in entries:
        candidates = [images_dir / relative, images_dir / relative.name]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise LayoutError(f"{relative}: listed in {annotation_file} but not found under {images_dir}; give the "
                              "image folder with images=DIR (COCO: the folder holding val2014/)")
        paths.append(found)
    samples = [(path, captions) for path, (_, captions) in zip(paths, entries, strict=True)]
    return EvalSet("retrieval", layout, annotation_file, [annotation_file, *paths], _file_samples(samples),
                   len(samples), details={"images_dir": str(images_dir)})


def open_eval_set(source, labels=None, images=None):
    """The EvalSet at `source` (a folder, or a Karpathy-split JSON), whichever layout it is in; an s3://, gs:// or
    hf:// folder is copied to a temporary folder (removed at exit) first.
    `labels`: a flat ImageNet folder's label file; `images`: a Karpathy JSON's image folder."""
    if is_remote(source):
        local = Path(tempfile.mkdtemp(prefix="harmony-eval-"))
        atexit.register(shutil.rmtree, local, True)
        stage(str(source), local)
        return open_eval_set(local, labels, images)
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        return _karpathy(source, images)
    if not source.is_dir():
        raise LayoutError(f"{source}: not found (or not a folder or .json); expected {LAYOUTS_HELP}")
    if (source / "test").is_dir() and ((source / "classnames.txt").is_file()
                                       or (source / "dataset_type.txt").is_file()):
        return _clip_benchmark(source)
    shards = sorted(path for path in source.iterdir() if path.name.endswith((".tar", ".tar.zst")))
    if shards:
        return _held_out_shards(source, shards)
    folders = sorted(path.name for path in source.iterdir() if path.is_dir())
    if folders and all(SYNSET.fullmatch(folder) for folder in folders):
        return _synset_folders(source, folders)
    images = _images_in(source)
    if images:
        label_file = Path(labels) if labels else next(
            (folder / name for folder in (source, source.parent) for name in LABEL_FILES
             if (folder / name).is_file()), None)
        if label_file is None or not label_file.is_file():
            raise LayoutError(f"{source}: a flat image folder without a label file; give labels=FILE or put "
                              f"one of {', '.join(LABEL_FILES)} in it or its parent")
        return _flat_imagenet(source, images, label_file)
    if (source / "classes.json").is_file():
        listing = json.loads((source / "classes.json").read_text())
        return _class_folders(source, listing["folders"], listing["classes"], str(source / "classes.json"),
                              "class folders", "simple")
    if any(_images_in(source / folder) for folder in folders):
        return _class_folders(source, folders, [folder.replace("_", " ") for folder in folders],
                              "the folder names", "class folders", "simple")
    raise LayoutError(f"{source}: in none of the evaluation layouts; expected {LAYOUTS_HELP}")


def open_image(image):
    """A PIL image from an image file or a ShardImage."""
    return Image.open(io.BytesIO(image.data) if isinstance(image, ShardImage) else image)


class UndecodableImage(ValueError):
    """An evaluation image that does not decode; `where` names it (its path, or its shard and sample key)."""

    def __init__(self, where, reason):
        super().__init__(f"{where}: the image does not decode ({reason}); run `make verify` on shards, or remove "
                         "the file")
        self.where = where


def image_name(image):
    """Where an image (a path or a ShardImage) is read from, for messages."""
    return image.where if isinstance(image, ShardImage) else str(image)


def decode_image(image):
    """The decoded PIL image of an image file or a ShardImage; UndecodableImage naming it when it does not decode
    (PIL's own message names a ShardImage's bytes as a BytesIO object, so it is not repeated)."""
    try:
        decoded = open_image(image)
        decoded.load()
    except UnidentifiedImageError:
        raise UndecodableImage(image_name(image), "not in an image format PIL reads") from None
    except (OSError, SyntaxError, EOFError, ValueError) as error:  # PIL's errors for corrupt or truncated data
        raise UndecodableImage(image_name(image), str(error) or type(error).__name__) from None
    return decoded

