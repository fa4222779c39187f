"""`make verify`: every training shard re-checked against manifest.json (hash, size, sample count, DALI index)."""

from pathlib import Path

from tqdm import tqdm

from datapipe.common import manifest, shard_io


def verify(out_dir):
    """Re-check every shard against the manifest: hash, size, sample count, DALI index. Returns problems."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / manifest.MANIFEST
    if not manifest_path.exists():
        return [f"{manifest_path} is missing; run `make shards` first"]
    try:  # every name a plain file name in out_dir: nothing outside it is read
        recorded = manifest.read_manifest(manifest_path, manifest.REMOTE_FIELDS, ("reconciliation", "totals"))
    except manifest.ManifestError as error:
        return [str(error)]
    problems = []
    for entry in tqdm(recorded["shards"], desc="verify", unit="shard"):
        tar_path = out_dir / entry["name"]
        if not tar_path.exists():
            problems.append(f"{tar_path}: missing")
            continue
        if tar_path.stat().st_size != entry["bytes"]:
            problems.append(f"{tar_path}: {tar_path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if shard_io.sha256_file(tar_path) != entry["sha256"]:
            problems.append(f"{tar_path}: sha256 differs from the manifest (file changed or corrupt)")
            continue
        keys = [sample["__key__"] for sample in shard_io.read_samples([tar_path])]
        if len(keys) != entry["samples"]:
            problems.append(f"{tar_path}: {len(keys)} samples, manifest says {entry['samples']}")
        if "index" in entry:
            problems += _verify_index(tar_path, out_dir / entry["index"], keys, entry.get("index_sha256"))
    counts = recorded["reconciliation"]
    if not (counts["download_balanced"] and counts["shards_balanced"] and counts.get("url_list_balanced", True)):
        problems.append(f"{manifest_path}: the counts do not reconcile: {counts}")
    if sum(entry["samples"] for entry in recorded["shards"]) != recorded["totals"]["samples"]:
        problems.append(f"{manifest_path}: shard sample counts do not add up to totals.samples")
    return problems


def _verify_index(tar_path, index_path, keys, index_sha256=None):
    if not index_path.exists():
        return [f"{index_path}: missing DALI index"]
    try:
        entries = shard_io.read_dali_index(index_path)
    except (ValueError, IndexError) as error:
        return [f"{index_path}: unreadable ({error})"]
    if [key for key, _ in entries] != keys:
        return [f"{index_path}: its keys differ from the tar's; rebuild with `make shards`"]
    actual = shard_io.member_offsets(tar_path)
    for key, components in entries:
        for extension, location in components.items():
            if actual.get(f"{key}.{extension}") != location:
                return [f"{index_path}: entry {key}.{extension} points to the wrong bytes"]
    if index_sha256 is not None and shard_io.sha256_file(index_path) != index_sha256:
        return [f"{index_path}: sha256 differs from the manifest (file changed or corrupt)"]
    return []
