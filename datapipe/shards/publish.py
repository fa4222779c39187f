"""Publish training shards built locally to object storage, and stage a remote folder locally.

    python -m datapipe.shards.publish put shards/.staging/cc3m/train s3://bucket/cc3m/train
    python -m datapipe.shards.publish get s3://bucket/cc3m/raw shards/.staging/cc3m/raw

`put` uploads each shard and DALI index the remote copy lacks (by name, size and the manifest's
sha256), then the report and rejected list, then manifest.json last, so a reader that starts from
the manifest never sees a half-published set. Re-publishing a rebuilt set uploads only what changed,
and afterwards removes the shards (and indexes) the previous remote manifest listed and the new one
does not: only objects this project wrote, named as `make shards` names shards and still holding the
sha256 that manifest recorded; anything else it lists is left alone, and said so.
`get` copies the objects of a remote folder that the local folder lacks or has at another size
(`make shards OUT=s3://...` builds from a local copy of raw shards kept in object storage); an object
whose name is not a plain file name ('..') is refused before anything is copied.
"""

import argparse
import os
import re
import time
from pathlib import Path

from tqdm import tqdm

from datapipe.common.manifest import (
    MANIFEST,
    REJECTED,
    REMOTE_FIELDS,
    REPORT,
    ManifestError,
    is_plain_file_name,
    parse_manifest,
    read_manifest,
)
from datapipe.common.object_store import RemoteFolder, StorageError, is_remote

SHARD_FILE = re.compile(r"[0-9]{6,}\.(tar|tar\.zst|idx)")  # the names `make shards` gives shards and indexes


def _listed_files(manifest):
    """{file name: size in bytes or None} of the shards and indexes a manifest lists (None: size not recorded)."""
    files = {}
    for entry in manifest["shards"]:
        files[entry["name"]] = entry["bytes"]
        if "index" in entry:
            files[entry["index"]] = None
    return files


def _remote_manifest(remote, remote_sizes):
    if MANIFEST not in remote_sizes:
        return None
    try:
        return parse_manifest(remote.read_bytes(MANIFEST), remote.url(MANIFEST), fields={"name": str})
    except ManifestError as error:  # unusable: treat the remote copy as unknown, upload everything, remove nothing
        print(f"note: {error}; it is replaced, and nothing it lists is removed")
        return None


def _earlier_files(earlier):
    """(file name, sha256 recorded for it or None) of each shard and index the earlier manifest lists."""
    for entry in earlier["shards"]:
        yield entry["name"], entry.get("sha256")
        if "index" in entry:
            yield entry["index"], entry.get("index_sha256")


def _why_not_ours(remote, name, recorded_sha256, size):
    """Why the object `name` (of `size` bytes) cannot be shown to be a file this project wrote, or None."""
    if not SHARD_FILE.fullmatch(name):
        return "not a name `make shards` gives"
    if not isinstance(recorded_sha256, str):
        return "the earlier manifest records no sha256 for it"
    if remote.download(name, os.devnull) != recorded_sha256:
        return f"its {size} bytes are not those the earlier manifest recorded: another sha256"
    return None


def _stale_files(remote, earlier, now_listed, remote_sizes):
    """(names to remove, 'name (why)' of those left alone): the objects the earlier manifest lists and the new one
    does not; removed only when named as shards and still holding the sha256 the earlier manifest recorded."""
    removable, left_alone = [], []
    for name, recorded_sha256 in _earlier_files(earlier or {"shards": []}):
        if name in now_listed or name not in remote_sizes or name in removable:
            continue
        why = _why_not_ours(remote, name, recorded_sha256, remote_sizes[name])
        if why:
            left_alone.append(f"{name} ({why})")
        else:
            removable.append(name)
    return sorted(removable), left_alone


def publish(local_dir, location):
    """Upload the training shards in `local_dir` to `location`; returns (files uploaded, files removed)."""
    local_dir = Path(local_dir)
    manifest_path = local_dir / MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{manifest_path} not found: build the shards first (`make shards`)")
    try:
        manifest = read_manifest(manifest_path, REMOTE_FIELDS)
    except ManifestError as error:
        raise StorageError(str(error)) from None
    remote = RemoteFolder(location)
    remote_sizes = remote.sizes(missing_ok=True)  # a first publish makes the folder
    earlier = _remote_manifest(remote, remote_sizes)
    earlier_hashes = {entry["name"]: entry.get("sha256") for entry in (earlier or {"shards": []})["shards"]}
    uploads = []
    for entry in manifest["shards"]:
        unchanged = earlier_hashes.get(entry["name"]) == entry["sha256"] \
            and remote_sizes.get(entry["name"]) == entry["bytes"]
        names = [entry["name"]] + ([entry["index"]] if "index" in entry else [])
        for name in names:
            if not unchanged or remote_sizes.get(name) != (local_dir / name).stat().st_size:
                uploads.append(name)
    uploads += [name for name in (REPORT, REJECTED) if (local_dir / name).is_file()]
    started = time.perf_counter()
    uploaded_bytes = 0
    for name in tqdm(uploads, desc=f"publish to {location}", unit="file"):
        remote.upload(local_dir / name, name)
        uploaded_bytes += (local_dir / name).stat().st_size
    remote.upload(manifest_path, MANIFEST)  # last: readers start from it
    removed, left_alone = _stale_files(remote, earlier, _listed_files(manifest), remote_sizes)
    for name in removed:
        remote.remove(name)
    kept = len(manifest["shards"]) - sum(name.endswith(".tar") for name in uploads)
    print(f"publish done: {len(uploads) + 1} files ({uploaded_bytes / 1e6:.1f} MB) uploaded to {location} in "
          f"{time.perf_counter() - started:.1f} s, {kept} unchanged shards kept, {len(removed)} files the new "
          f"manifest does not list removed")
    if left_alone:
        print(f"left alone in {location}: {len(left_alone)} object(s) the earlier manifest listed that this project "
              f"cannot show it wrote: {'; '.join(left_alone)}. Remove them yourself if they are not needed.")
    return uploads + [MANIFEST], removed


def _check_plain_names(location, names, local_dir):
    """Raise StorageError if an object's name is not a plain file name ('..'): it would land outside `local_dir`."""
    unsafe = [name for name in names if not is_plain_file_name(name)]
    if unsafe:
        raise StorageError(f"{location} holds an object named {unsafe[0]!r}, which is not a plain file name and "
                           f"would be copied outside {local_dir}: nothing was copied; remove or rename that object")


def _download_whole(remote, name, local_dir):
    """Copy one object to local_dir/name through a .partial file, which is removed if the copy fails."""
    partial = local_dir / f"{name}.partial"
    try:
        remote.download(name, partial)
        partial.replace(local_dir / name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def stage(location, local_dir):
    """Copy the objects of the remote folder `location` that `local_dir` lacks or holds at another size."""
    local_dir = Path(local_dir)
    remote = RemoteFolder(location)
    sizes = remote.sizes()
    _check_plain_names(location, sizes, local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    wanted = [name for name, size in sorted(sizes.items())
              if not (local_dir / name).is_file() or (local_dir / name).stat().st_size != size]
    for name in tqdm(wanted, desc=f"stage {location}", unit="file"):
        _download_whole(remote, name, local_dir)
    print(f"stage done: {len(wanted)} files copied from {location} to {local_dir}")
    return wanted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    put = commands.add_parser("put", help="upload a local training-shard folder, manifest last")
    put.add_argument("local_dir")
    put.add_argument("location")
    get = commands.add_parser("get", help="copy a remote folder's objects to a local folder")
    get.add_argument("location")
    get.add_argument("local_dir")
    args = parser.parse_args(argv)
    location = args.location
    if not is_remote(location):
        raise SystemExit(f"error: {location} is not an s3://, gs:// or hf:// location")
    try:
        if args.command == "put":
            publish(args.local_dir, location)
        else:
            stage(location, args.local_dir)
    except StorageError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
