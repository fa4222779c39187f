"""Publish training shards built locally to object storage, and stage a remote folder locally.

    python -m datapipe.publish put shards/.staging/cc3m/train s3://bucket/cc3m/train
    python -m datapipe.publish get s3://bucket/cc3m/raw shards/.staging/cc3m/raw

`put` uploads each shard and DALI index the remote copy lacks (by name, size and the manifest's
sha256), then the report and rejected list, then manifest.json last, so a reader that starts from
the manifest never sees a half-published set. Re-publishing a rebuilt set uploads only what changed,
and afterwards removes the shards (and indexes) the previous remote manifest listed and the new one
does not: only what an earlier publish put there, never any other object under the location.
`get` copies the objects of a remote folder that the local folder lacks or has at another size
(`make shards OUT=s3://...` builds from a local copy of raw shards kept in object storage).
"""

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from datapipe.manifest import MANIFEST, REJECTED, REPORT
from datapipe.object_store import RemoteFolder, StorageError, is_remote


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
        return json.loads(remote.read_bytes(MANIFEST))
    except json.JSONDecodeError:
        return None  # unreadable: treat the remote copy as unknown and upload everything


def publish(local_dir, location):
    """Upload the training shards in `local_dir` to `location`; returns (files uploaded, files removed)."""
    local_dir = Path(local_dir)
    manifest_path = local_dir / MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{manifest_path} not found: build the shards first (`make shards`)")
    manifest = json.loads(manifest_path.read_text())
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
    now_listed = _listed_files(manifest)
    removed = sorted(name for name in _listed_files(earlier or {"shards": []})
                     if name not in now_listed and name in remote_sizes)
    for name in removed:
        remote.remove(name)
    kept = len(manifest["shards"]) - sum(name.endswith(".tar") for name in uploads)
    print(f"publish done: {len(uploads) + 1} files ({uploaded_bytes / 1e6:.1f} MB) uploaded to {location} in "
          f"{time.perf_counter() - started:.1f} s, {kept} unchanged shards kept, {len(removed)} files the new "
          f"manifest does not list removed")
    return uploads + [MANIFEST], removed


def stage(location, local_dir):
    """Copy the objects of the remote folder `location` that `local_dir` lacks or holds at another size."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    remote = RemoteFolder(location)
    wanted = [name for name, size in sorted(remote.sizes().items())
              if not (local_dir / name).is_file() or (local_dir / name).stat().st_size != size]
    for name in tqdm(wanted, desc=f"stage {location}", unit="file"):
        partial = local_dir / f"{name}.partial"
        remote.download(name, partial)
        partial.replace(local_dir / name)
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
