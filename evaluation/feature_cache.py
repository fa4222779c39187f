"""Features of evaluation sets, cached on disk and keyed by everything they are computed from.

`<run>/features/<set>-<key>/` holds one float32 file per feature (`embedding.f32`, `cls.f32`,
`patch_mean.f32`, n rows each), the targets (`targets.json`) and `made_from.json`. The key is a SHA-256 of
the teacher weights' SHA-256, the crop size, the source of the code that computes features (model/vit.py,
evaluation/towers.py) and every file the set is read from (path, size, modification time). A new checkpoint,
a changed image or label file, or changed feature code gives another key, so the features are computed
again, never reused stale. An entry is complete or absent (written aside, then renamed into place); older
entries of the same set are removed. Features are read back memory-mapped: an ImageNet-size set need not
fit in memory. Images that do not decode are left out (with their targets), counted, and the first few named
in made_from.json; a set none of whose images decode is refused.
"""

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import model.vit
from evaluation.datasets import LayoutError

FEATURE_FILES = ("embedding", "cls", "patch_mean")
UNDECODABLE_NAMED = 5  # images that do not decode, named in the result (all are counted)
FEATURE_CODE = (Path(model.vit.__file__), Path(__file__).with_name("towers.py"))


def set_name(source):
    """A folder name for an evaluation set: its own name and a digest of its full path."""
    resolved = str(Path(source).resolve())
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(source).name)}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def cache_key(eval_set, weights_sha256, crop_px):
    digest = hashlib.sha256(json.dumps({"weights_sha256": weights_sha256, "crop_px": crop_px,
                                        "layout": eval_set.layout}).encode())
    for path in FEATURE_CODE:
        digest.update(path.read_bytes())
    for path in eval_set.files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _load(entry):
    made_from = json.loads((entry / "made_from.json").read_text())
    features = {name: torch.from_numpy(np.memmap(entry / f"{name}.f32", dtype=np.float32, mode="c",
                                                 shape=(made_from["rows"], made_from["dims"][name])))
                for name in FEATURE_FILES}
    skipped = {"images": made_from.get("undecodable_images", 0), "first": made_from.get("undecodable_first", [])}
    return features, json.loads((entry / "targets.json").read_text()), skipped


def _compute(towers, eval_set, partial):
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    targets, dims, rows, undecodable = [], {}, 0, []

    def images():  # records each image's target as the encoder reads it
        for image, target in eval_set.samples():
            targets.append(target)
            yield image

    with contextlib.ExitStack() as stack:
        streams = {name: stack.enter_context(open(partial / f"{name}.f32", "wb")) for name in FEATURE_FILES}
        for batch in towers.iter_image_features(images(), desc=f"{eval_set.source.name} features",
                                                count=eval_set.count, undecodable=undecodable):
            for name in FEATURE_FILES:
                streams[name].write(batch[name].float().numpy().tobytes())
                dims[name] = batch[name].shape[1]
            rows += len(batch["cls"])
    skipped = {"images": len(undecodable), "first": [where for _, where in undecodable[:UNDECODABLE_NAMED]]}
    if not rows:
        raise LayoutError(f"{eval_set.source}: no image to evaluate" + (
            f"; none of its {len(undecodable)} image(s) decode (first: {', '.join(skipped['first'])}); run `make "
            "verify` on shards, or replace the files" if undecodable else ""))
    left_out = {position for position, _ in undecodable}
    kept = [target for position, target in enumerate(targets) if position not in left_out]
    (partial / "targets.json").write_text(json.dumps(kept))
    return rows, dims, skipped


def encode(towers, eval_set):
    """(features {name: (n, dim)}, targets, {images, first}: how many images did not decode, and the first few
    by name) of `eval_set` with `towers` (a RunTowers), from the cache or computed. Images that do not decode are
    left out, with their targets."""
    key = cache_key(eval_set, towers.weights_sha256, towers.config.global_crop_px)
    root, name = towers.run_dir / "features", set_name(eval_set.source)
    entry = root / f"{name}-{key[:20]}"
    if not (entry / "made_from.json").is_file():
        partial = entry.with_name(entry.name + ".partial")
        try:
            rows, dims, skipped = _compute(towers, eval_set, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
            raise
        (partial / "made_from.json").write_text(json.dumps({
            "key": key, "rows": rows, "dims": dims, **eval_set.describe(), "files": len(eval_set.files),
            "weights_sha256": towers.weights_sha256, "crop_px": towers.config.global_crop_px,
            "undecodable_images": skipped["images"], "undecodable_first": skipped["first"]}, indent=2))
        partial.rename(entry)
        for older in root.glob(f"{name}-*"):
            if older != entry:
                shutil.rmtree(older)
    return _load(entry)
