"""Evaluation images that training shards must not contain: `make shards EXCLUDE=<folder or shards>[:...]`.

Each EXCLUDE path is a folder (searched recursively for image files and for webdataset .tar shards), one
image or one .tar shard. Every image is decoded as `make shards` decodes training images (EXIF orientation,
RGB) and given the same near-duplicate signature, so a training sample within `eval_overlap_bits` of any of
them (and confirmed by the details) is dropped as `eval_overlap`. The images are hashed in parallel each build
(an evaluation set is small next to the training data).
"""

import dataclasses
import hashlib
import tarfile
from pathlib import Path

import numpy as np

from datapipe.common import shard_io
from datapipe.common.near_duplicates import signature
from datapipe.common.validate import Rejected, decode_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILES_PER_TASK = 256


class ExclusionError(ValueError):
    """An EXCLUDE path that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class ExclusionSet:
    """The images of one EXCLUDE path: names relative to it (`shard.tar/key.jpg` inside shards) and hashes."""

    path: str
    names: tuple[str, ...]
    hashes: np.ndarray  # (n,) uint64 perceptual hashes
    details: np.ndarray  # (n, 64) uint8: what confirms a pair (datapipe.common.near_duplicates.signature)
    unreadable: tuple[str, ...]  # "name: why" of images that could not be decoded (not checked against)

    def summary(self):
        fingerprint = hashlib.sha256("\n".join(self.names).encode() + self.hashes.tobytes()).hexdigest()[:16]
        return {"path": self.path, "images": len(self.names), "unreadable": len(self.unreadable),
                "fingerprint": fingerprint}


def _tasks(root):
    """[(root, [image file names], [tar shard names])] units of work under one EXCLUDE path, names relative to it."""
    if root.is_file():
        files = [root.name]
        root = root.parent
    else:
        files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    images = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    tars = [name for name in files if name.endswith(".tar")]
    return ([(root, images[start:start + FILES_PER_TASK], []) for start in range(0, len(images), FILES_PER_TASK)]
            + [(root, [], [name]) for name in tars])


def _signature(data):
    rgb, *_ = decode_rgb(data)
    return signature(rgb)


def _images(root, image_names, tar_names):
    """(name, bytes) of each image file and each image member of the tar shards, read one at a time."""
    for name in image_names:
        yield name, (root / name).read_bytes()
    for tar_name in tar_names:
        try:
            for sample in shard_io.read_samples([root / tar_name]):
                for extension, data in sample.items():
                    if f".{extension}".lower().endswith(IMAGE_SUFFIXES):
                        yield f"{tar_name}/{sample['__key__']}.{extension}", data
        except (tarfile.TarError, EOFError, ValueError) as error:  # webdataset adds the open stream to args
            why = f"{type(error).__name__}: {error.args[0] if error.args else error}"
            raise ExclusionError(f"EXCLUDE file '{root / tar_name}' is not a readable tar shard ({why}); the "
                                 "evaluation images it may hold cannot be checked. Replace it with an intact copy, "
                                 "or move it out of the EXCLUDE path if it holds no evaluation images.") from None


def hash_images(root, image_names, tar_names):
    """[(name, signature or None, why it could not be read)] of image files and of the image members of tar
    shards."""
    results = []
    for name, data in _images(root, image_names, tar_names):
        try:
            results.append((name, _signature(data), ""))
        except Rejected as rejection:
            results.append((name, None, f"{rejection.reason}: {rejection.detail}"))
    return results


def load(paths, pool):
    """An ExclusionSet per path, hashed in parallel on `pool` (a concurrent.futures executor)."""
    sets = []
    for path in paths:
        root = Path(path)
        if not root.exists():
            raise ExclusionError(f"EXCLUDE path '{path}' does not exist; give folders, images or .tar shards of "
                                 "evaluation images, separated by ':' (a ':' inside a path is written '\\:')")
        tasks = _tasks(root)
        if not tasks:
            raise ExclusionError(f"EXCLUDE path '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar "
                                 "shards: nothing to exclude. Point it at the evaluation images.")
        results = [row for rows in pool.map(hash_images, *zip(*tasks, strict=True)) for row in rows]
        readable = [(name, value) for name, value, _ in results if value is not None]
        sets.append(ExclusionSet(str(path), tuple(name for name, _ in readable),
                                 np.array([phash for _, (phash, _) in readable], dtype=np.uint64),
                                 np.array([np.frombuffer(details, np.uint8) for _, (_, details) in readable]),
                                 tuple(f"{name}: {why}" for name, value, why in results if value is None)))
        if not readable:
            raise ExclusionError(f"EXCLUDE path '{path}': none of its {len(results)} images could be decoded "
                                 f"(for example {results[0][0]}: {results[0][2]})")
    return sets
