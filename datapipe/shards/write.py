"""Pass 3: write each planned training shard and its DALI index, in parallel; a work tar is deleted as soon as
every shard that reads it is written."""

import json
from concurrent.futures import as_completed
from pathlib import Path

from tqdm import tqdm

from datapipe.common import manifest, shard_io
from datapipe.shards.plan import done_record, output_path, shard_members
from datapipe.shards.work import WORK_DIR, work_paths

EXTENSIONS = ("jpg", "json", "tokens", "txt")  # what a training sample holds


def write_output_shard(out_dir, shard, records_paths, counts, compress, raw_dir):
    """Write one training shard (and its DALI index) from the work tars, and from the raw tars for images stored
    as they came. Returns its manifest entry."""
    members = shard_members(records_paths, counts, shard.candidates)
    tar_path = output_path(out_dir, shard.name, compress)

    def read(stream, location):
        stream.seek(location[0])
        return stream.read(location[1])

    def samples():
        for work_tar in dict.fromkeys(path for path, _, _ in members):  # each work tar opened and indexed once
            offsets = shard_io.member_offsets(work_tar)
            raw_tar = Path(raw_dir) / Path(work_tar).name
            with open(work_tar, "rb") as work, open(raw_tar, "rb") as raw:
                for _, key, jpg_in_raw in (member for member in members if member[0] == work_tar):
                    sample = {extension: read(work, offsets[f"{key}.{extension}"])
                              for extension in EXTENSIONS if extension != "jpg"}
                    sample["jpg"] = read(raw, jpg_in_raw) if jpg_in_raw else read(work, offsets[f"{key}.jpg"])
                    yield {"__key__": key, **sample}

    shard_io.write_tar(tar_path, samples())
    entry = dict(name=tar_path.name, samples=len(members), bytes=tar_path.stat().st_size,
                 sha256=shard_io.sha256_file(tar_path), first_key=members[0][1], last_key=members[-1][1])
    if not compress:
        shard_io.write_dali_index(tar_path, tar_path.with_suffix(".idx"))
        entry.update(index=tar_path.with_suffix(".idx").name,
                     index_sha256=shard_io.sha256_file(tar_path.with_suffix(".idx")))
    manifest.write_atomic(done_record(out_dir, shard.name), json.dumps(dict(made_from=shard.made_from, entry=entry)))
    return entry


def write_shards(pool, out_dir, to_write, records_paths, counts, compress, raw_dir):
    """Write the planned shards `to_write`; a work tar is deleted once every shard that reads it is written,
    so the disk never holds two copies of the cleaned samples."""
    readers = {}
    for shard in to_write:
        for stem in shard.made_from["work"]:
            readers[stem] = readers.get(stem, 0) + 1
    futures = {pool.submit(write_output_shard, out_dir, shard, records_paths, counts, compress, raw_dir): shard
               for shard in to_write}
    entries = {}
    for future in tqdm(as_completed(futures), total=len(futures), desc="write", unit="shard"):
        shard = futures[future]
        entries[shard.name] = future.result()
        for stem in shard.made_from["work"]:
            readers[stem] -= 1
            if readers[stem] == 0:
                work_paths(out_dir / WORK_DIR, stem)[0].unlink()
    return entries
