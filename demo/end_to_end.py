"""The demo set built end to end, as `make download shards` builds it: generated, served on 127.0.0.1,
downloaded with img2dataset, sharded. The tests' shared fixtures build their sets with `build`.

Where img2dataset is missing (the GPU machines, README "Validating on a GPU machine"), a copy of sets built
here stands in: `make gpu-kit` packs them, and with HARMONY_PREBUILT_DEMO=<folder> the fixtures copy
`<folder>/<pairs>x<samples_per_shard>/` instead of building (`build_or_copy`)."""

import json
import os
import shutil
from pathlib import Path

PREBUILT_DEMO_ENV = "HARMONY_PREBUILT_DEMO"
# (pairs, samples per shard) of the tests' two shared sets: a small one, and one a short run learns from.
TEST_SETS = {"small": (120, 50), "larger": (2000, 250)}


def folder_name(pairs, samples_per_shard):
    return f"{pairs}x{samples_per_shard}"


def describe(root):
    """What a built demo folder holds: its raw download, training shards and manifest, held-out split, items."""
    import demo.dataset

    root = Path(root)
    return dict(root=root, raw=root / "raw", train=root / "train",
                manifest=json.loads((root / "train" / "manifest.json").read_text()),
                heldout=root / "source" / "heldout", items=demo.dataset.load_items(root / "source"))


def build(root, pairs, samples_per_shard):
    import demo.download
    from datapipe import shards

    root = Path(root)
    demo.download.download_demo(root / "raw", demo_root=root / "source", demo_size=pairs, processes=2, threads=8)
    shards.build(root / "raw", root / "train", samples_per_shard=samples_per_shard, processes=2)
    return describe(root)


def build_or_copy(root, pairs, samples_per_shard):
    """`build`, or a copy of the prebuilt folder that HARMONY_PREBUILT_DEMO names (it must hold this set)."""
    prebuilt = os.environ.get(PREBUILT_DEMO_ENV)
    if not prebuilt:
        return build(root, pairs, samples_per_shard)
    source = Path(prebuilt) / folder_name(pairs, samples_per_shard)
    if not (source / "train" / "manifest.json").is_file():
        raise FileNotFoundError(f"{PREBUILT_DEMO_ENV}={prebuilt} has no built demo set {source.name}/ "
                                f"(make gpu-kit packs it); unset {PREBUILT_DEMO_ENV} to build one here")
    shutil.copytree(source, root, dirs_exist_ok=True)
    return describe(root)
