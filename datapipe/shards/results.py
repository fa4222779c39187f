"""After the passes: rejected.jsonl.zst (every url the build did not keep, with its reason), report.md,
manifest.json (written last) and the summary line."""

import dataclasses
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from datapipe.common import captions, manifest, near_duplicates, shard_io
from datapipe.fetch.download import URL_LIST_RECORD, URL_LIST_REJECTED
from datapipe.shards.work import candidate_keys, read_records, rules_fingerprint

MANIFEST_VERSION = 2


def _url_list_rejections(raw_dir):
    """Each row of the url list that `make download` set aside (with its line number), streamed."""
    path = Path(raw_dir).parent / URL_LIST_REJECTED
    if path.is_file():
        with open(path) as lines:
            yield from map(json.loads, lines)


def _download_failures(raw_dir):
    """Each url img2dataset could not fetch, as a rejection row, streamed from its per-shard parquet files."""
    for parquet in sorted(Path(raw_dir).glob("*.parquet")):
        columns = ["key", "url", "status", "error_message"]
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=4096, columns=columns):
            for row in batch.to_pylist():
                if row["status"] != "success":
                    yield dict(stage="download", key=row["key"], url=row["url"], reason="download_failed",
                               detail=row["error_message"] or "")


def _shards_rejections(records_paths, counts, exact_duplicates, screened):
    """Each sample make shards dropped (with its reason), streamed: records in order, then the exact duplicates,
    then the evaluation overlaps and near duplicates."""
    for records_path in records_paths:
        for record in read_records(records_path):
            if record["reason"] is not None:
                yield dict(stage="shards", key=record["key"], url=record["url"], reason=record["reason"],
                           detail=record["detail"])
    looks_like = screened.matched[screened.outcome == near_duplicates.NEAR_DUPLICATE]
    dropped_rows = candidate_keys(records_paths, counts, np.union1d(exact_duplicates.index, screened.index))
    originals = candidate_keys(records_paths, counts, np.union1d(exact_duplicates.original, looks_like))
    for index, original_index in zip(*(array.tolist() for array in (exact_duplicates.index, exact_duplicates.original)),
                                     strict=True):
        key, url = dropped_rows[index]
        original = originals[original_index][0]
        yield dict(stage="shards", key=key, url=url, reason="duplicate", matches=original,
                   detail=f"same pixels as {original}")
    for index, outcome, matched, distance in zip(*(array.tolist() for array in (
            screened.index, screened.outcome, screened.matched, screened.distance)), strict=True):
        key, url = dropped_rows[index]
        if outcome == near_duplicates.EVAL_OVERLAP:
            eval_set, name = screened.references[matched]
            yield dict(stage="shards", key=key, url=url, reason="eval_overlap", eval_set=eval_set, matches=name,
                       detail=f"looks like {name} of {eval_set} (perceptual hashes {distance} of 64 bits apart)")
        else:
            original = originals[matched][0]
            yield dict(stage="shards", key=key, url=url, reason="near_duplicate", matches=original,
                       detail=f"looks like {original} (perceptual hashes {distance} of 64 bits apart)")


def _with_index_checksum(out_dir, entry):
    """The entry with its DALI index's sha256 (a shard written by an earlier version has none recorded): publish
    removes an index only when the object still has it."""
    if "index" not in entry or "index_sha256" in entry:
        return entry
    return {**entry, "index_sha256": shard_io.sha256_file(Path(out_dir) / entry["index"])}


def write_results(raw_dir, out_dir, made_from, records_paths, counts, exact_duplicates, screened, exclusion_sets,
                  entries, samples_per_shard, rules, duplicates, compress, workers, started):
    """`exact_duplicates`: an ExactDuplicates; `workers`: what the build ran on, for the summary line."""
    tally, examples = {"url_list": Counter(), "download": Counter(), "shards": Counter()}, {}
    entries = [_with_index_checksum(out_dir, entry) for entry in entries]

    def counted(rejections):
        for rejection in rejections:
            tally[rejection["stage"]][rejection["reason"]] += 1
            examples.setdefault((rejection["stage"], rejection["reason"]), rejection)
            yield rejection

    manifest.write_rejected(out_dir / manifest.REJECTED, counted(itertools.chain(
        _url_list_rejections(raw_dir), _download_failures(raw_dir),
        _shards_rejections(records_paths, counts, exact_duplicates, screened))))
    overlaps = Counter(screened.references[matched][0] for outcome, matched in
                       zip(screened.outcome.tolist(), screened.matched.tolist(), strict=True)
                       if outcome == near_duplicates.EVAL_OVERLAP)
    url_list_rows = sum(pq.read_metadata(parquet).num_rows for parquet in sorted(raw_dir.glob("*.parquet")))
    record = raw_dir.parent / URL_LIST_RECORD
    url_list = json.loads(record.read_text()) if record.is_file() else None
    in_raw = sum(1 for records_path in records_paths for _ in open(records_path))  # noqa: SIM115
    kept = sum(entry["samples"] for entry in entries)
    result = dict(
        version=MANIFEST_VERSION,
        name=out_dir.parent.name,
        source=str(raw_dir),
        format="webdataset" + (" (zstd-compressed tars, no DALI index)" if compress else ""),
        samples_per_shard=samples_per_shard,
        fields=manifest.FIELDS,
        rules={**dataclasses.asdict(rules),
               "duplicates": "same decoded RGB pixels; the first in key order is kept",
               **duplicates.describe(),
               "near_duplicate_bits": duplicates.near_duplicate_bits, "eval_overlap_bits": duplicates.eval_overlap_bits,
               "eval_overlap_fine_bits": duplicates.eval_overlap_fine_bits,
               "context_length": captions.CONTEXT_LENGTH},
        exclude=[{**excluded.summary(), "overlapping_samples": overlaps[excluded.path]} for excluded in exclusion_sets],
        made_from={"raw_shards": [work["raw"] for work in made_from.values()],
                   "rules": rules_fingerprint(rules, duplicates.hashing)},
        shards=entries,
        totals=dict(shards=len(entries), samples=kept, bytes=sum(e["bytes"] for e in entries)),
        reconciliation=manifest.reconciliation(url_list_rows, tally["download"], in_raw, kept, tally["shards"],
                                               url_list, tally["url_list"]),
    )
    manifest.write_report(out_dir / manifest.REPORT, result, examples)
    manifest.write_atomic(out_dir / manifest.MANIFEST, json.dumps(result, indent=2, ensure_ascii=False))  # last
    elapsed_s = time.perf_counter() - started
    for excluded, entry in zip(exclusion_sets, result["exclude"], strict=True):
        print(f"EXCLUDE {excluded.path}: {entry['images']} images, {entry['overlapping_samples']} training samples "
              "dropped as eval_overlap" + (f"; {len(excluded.unreadable)} could not be read and were not checked: "
                                          f"{'; '.join(excluded.unreadable[:5])}" if excluded.unreadable else ""))
    counts = result["reconciliation"]
    print(f"shards done: {in_raw} downloaded -> {kept} kept in {len(entries)} shards, "
          f"{in_raw - kept} rejected ({', '.join(f'{n} {r}' for r, n in counts['rejected'].items()) or 'none'}); "
          f"{in_raw / elapsed_s:.0f} samples/s on {workers}; see {out_dir / manifest.REPORT}")
    return result
