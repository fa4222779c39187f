"""Pass 2, last step: the plan (fixed-size runs of the kept candidates, one per training shard), and which
planned shards are already on disk exactly as planned (made from the same work, keys and settings)."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datapipe.common import shard_io
from datapipe.shards.work import WORK_DIR, accepted_records


def shard_members(records_paths, counts, candidates):
    """[(work tar, key, (offset, size) of its JPEG in the raw tar or None)] of the candidate indices `candidates`
    (sorted), in order; `records_paths` and `counts` cover every raw shard, in candidate order."""
    return [(str(Path(records_paths[number]).with_suffix(".tar")), record["key"], record.get("jpg_in_raw"))
            for number, _, record in accepted_records(records_paths, counts, candidates)]


def done_record(out_dir, shard_name):
    return Path(out_dir) / WORK_DIR / f"{shard_name}.done.json"


def output_path(out_dir, shard_name, compress):
    return Path(out_dir) / f"{shard_name}{'.tar.zst' if compress else '.tar'}"


@dataclasses.dataclass(frozen=True)
class PlannedShard:
    """One training shard of the plan: its name, its samples (candidate indices) and what it is made from."""

    name: str
    candidates: np.ndarray
    made_from: dict  # the work it reads (each with what that work was made from), the hash of its keys, settings


def plan_shard(out_dir, shard, records_paths, counts, compress):
    """(the shard with its keys' hash, whether the file on disk was written from exactly that)."""
    keys = [key for _, key, _ in shard_members(records_paths, counts, shard.candidates)]
    shard = dataclasses.replace(shard, made_from={**shard.made_from, "compress": compress,
                                                  "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest()})
    tar_path, done_path = output_path(out_dir, shard.name, compress), done_record(out_dir, shard.name)
    if not (tar_path.exists() and done_path.exists() and (compress or tar_path.with_suffix(".idx").exists())):
        return shard, False
    try:
        done = json.loads(done_path.read_text())
    except json.JSONDecodeError:
        return shard, False  # a record cut short: write the shard again
    # A record written by an earlier version of this code may lack fields: then the shard is written again.
    return shard, (done.get("made_from") == shard.made_from
                   and shard_io.sha256_file(tar_path) == done.get("entry", {}).get("sha256"))


def planned_shard(number, candidates, counts, made_from):
    """Training shard `number` of the plan, holding the candidate indices `candidates` (sorted); `made_from`:
    {raw shard stem: what its work was made from}, in candidate order, as `counts`."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    stems = list(made_from)
    reads = np.unique(np.searchsorted(offsets, candidates, side="right") - 1)
    return PlannedShard(f"{number:06d}", candidates, {"work": {stems[index]: made_from[stems[index]]
                                                                for index in reads}})


def plan_shards(pool, out_dir, kept, records_paths, counts, made_from, samples_per_shard, compress):
    """(the plan: a PlannedShard per `samples_per_shard` of the `kept` candidates, those of it still to write);
    `made_from`: {raw shard stem: what its work was made from}, in candidate order."""
    plan = [planned_shard(number, kept[start:start + samples_per_shard], counts, made_from)
            for number, start in enumerate(range(0, len(kept), samples_per_shard))]
    futures = [pool.submit(plan_shard, out_dir, shard, records_paths, counts, compress) for shard in plan]
    planned = [future.result() for future in tqdm(futures, desc="check", unit="shard", leave=False)]
    return [shard for shard, _ in planned], [shard for shard, written in planned if not written]
