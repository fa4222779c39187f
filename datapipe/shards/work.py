"""Work records: what pass 1 leaves in <out>/_work/ for each raw shard, what it was made from, and reading it.

For each raw shard `<stem>.tar`: `<stem>.tar` (cleaned samples), `<stem>.jsonl` (one record per sample, sorted
by key: accepted with its pixel digest and perceptual hash, or rejected with a reason) and `<stem>.made-from.json`
(the raw tar's sha256 and the rules' fingerprint). The accepted samples of all raw shards, raw shards in name
order and keys in order within each, are the "candidates" that pass 2 numbers 0, 1, ...
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from datapipe.common import captions, shard_io

WORK_DIR = "_work"
WORK_VERSION = 3  # raise when pass 1 gives other output for the same input


def rules_fingerprint(rules, hashing):
    """What pass 1's output depends on besides the raw bytes."""
    settings = {**dataclasses.asdict(rules), "context_length": captions.CONTEXT_LENGTH, "work_version": WORK_VERSION,
                "perceptual_hash": hashing}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def raw_fingerprint(raw_tar):
    return {"name": Path(raw_tar).name, "bytes": Path(raw_tar).stat().st_size,
            "sha256": shard_io.sha256_file(raw_tar)}


def work_paths(work_dir, stem):
    """(cleaned samples tar, records, what they were made from) of one raw shard."""
    work_dir = Path(work_dir)
    return work_dir / f"{stem}.tar", work_dir / f"{stem}.jsonl", work_dir / f"{stem}.made-from.json"


def read_records(records_path):
    with open(records_path) as lines:
        for line in lines:
            yield json.loads(line)


def accepted_records(records_paths, counts, candidates):
    """(raw shard number, candidate index, its record) for the candidate indices `candidates` (sorted), in order;
    `records_paths` and `counts` cover every raw shard, in candidate order. Reads only the shards they are in."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for number in np.unique(np.searchsorted(offsets, candidates, side="right") - 1):
        wanted = set((candidates[(candidates >= offsets[number]) & (candidates < offsets[number + 1])]
                      - offsets[number]).tolist())
        accepted = (record for record in read_records(records_paths[number]) if record["reason"] is None)
        for index, record in enumerate(accepted):
            if index in wanted:
                yield int(number), int(offsets[number] + index), record


def candidate_keys(records_paths, counts, wanted):
    """{candidate index: (key, url)} for the candidate indices in `wanted` (a sorted array)."""
    return {index: (record["key"], record["url"])
            for _, index, record in accepted_records(records_paths, counts, wanted)}
