"""Pass 2 on Spark: exact duplicates, evaluation overlaps and near duplicates across the whole set, as DataFrame
joins and shuffles, decided by the local build's rules so that both keep the same samples.

- The candidates (accepted samples, numbered as datapipe/shards/work.py numbers them: raw shards in name order,
  keys in order) are rows read from pass 1's records by one task per raw shard.
- Exact duplicates: grouped by pixel digest (the same 128 bits of sha256 as datapipe/shards/duplicates.py); the
  lowest candidate index, the first in key order, is kept.
- Near duplicates: the local build's tables (datapipe/common/near_duplicates.table_masks): every hash is keyed
  by its bits under each table's mask, and a self-join on (table, key) gives the pairs the local search compares;
  those within the threshold are confirmed by their details (near_duplicates.confirmed, in Arrow batches).
- The decision: near_duplicates.screen, the local build's rule, on the confirmed pairs only (collected to the
  driver: 17 bytes a pair, never a hash per sample). Candidates are relabelled in order first, so the rule sees
  the same order, and its result does not depend on the number of workers or partitions.
"""

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F

from datapipe.common import near_duplicates
from datapipe.shards.duplicates import ExactDuplicates
from datapipe.shards.screen import Screened
from datapipe.shards.work import read_records

CANDIDATE_SCHEMA = "candidate long, shard int, digest string, phash long, details binary"
HASH_SCHEMA = "index long, phash long, details binary"  # candidates, then the evaluation images
PAIR_SCHEMA = "first long, second long, distance int"


def _signed(value):
    """A 64-bit unsigned value as the signed long Spark holds (the same bits)."""
    value = int(value)
    return value - (1 << 64) if value >= 1 << 63 else value


def candidate_rows(shard_number, records_path, first_candidate):
    """The candidates of one raw shard as CANDIDATE_SCHEMA rows, numbered from `first_candidate`."""
    accepted = (record for record in read_records(records_path) if record["reason"] is None)
    for position, record in enumerate(accepted):
        phash = record.get("phash")
        yield (first_candidate + position, shard_number, record["digest"][:32],
               _signed(int(phash, 16)) if phash else None, bytes.fromhex(record["details"]) if phash else None)


def _arrays(frame, columns):
    """The columns of a small DataFrame as int64 numpy arrays, sorted by the first, then the second..."""
    table = frame.select(*columns).toArrow()
    arrays = [np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.int64) for name in columns]
    order = np.lexsort(arrays[::-1])
    return [array[order] for array in arrays]


def exact_duplicates(candidates):
    """(ExactDuplicates of the candidates, the survivors: one candidate per pixel digest, the first)."""
    originals = candidates.groupBy("digest").agg(F.min("candidate").alias("original"))
    joined = candidates.join(originals, "digest")
    dropped = joined.where(F.col("candidate") != F.col("original")).select("candidate", "original")
    survivors = joined.where(F.col("candidate") == F.col("original")).drop("digest", "original")
    return ExactDuplicates(*_arrays(dropped, ["candidate", "original"])), survivors


def _near_pairs(session, hashes, count, threshold, first_reference):
    """(first, second, distance) of every pair first < second of `hashes` (HASH_SCHEMA, `count` rows) within
    `threshold` bits, once; pairs of two evaluation images (index >= first_reference) left out."""
    masks = session.createDataFrame([(table, _signed(mask)) for table, mask in enumerate(
        near_duplicates.table_masks(threshold, count))], "table int, mask long")
    keyed = hashes.select("index", "phash").crossJoin(F.broadcast(masks)).select(
        "table", F.col("phash").bitwiseAND(F.col("mask")).alias("key"), "index", "phash")
    left = keyed.withColumnsRenamed({"index": "first", "phash": "first_phash"})
    right = keyed.withColumnsRenamed({"index": "second", "phash": "second_phash"})
    together = left.join(right, ["table", "key"]).where(
        (F.col("first") < F.col("second")) & (F.col("first") < first_reference))
    distance = F.bit_count(F.col("first_phash").bitwiseXOR(F.col("second_phash"))).cast("int")
    return together.select("first", "second", distance.alias("distance")).where(
        F.col("distance") <= threshold).dropDuplicates(["first", "second"])


def _confirm(first_reference, eval_overlap_fine_bits):
    """A mapInArrow function keeping the pairs whose details confirm them (near_duplicates.confirmed)."""
    def confirm(batches):
        for batch in batches:
            columns = batch.to_pydict()
            first, second = (np.asarray(columns[name], dtype=np.int64) for name in ("first", "second"))
            details = [np.frombuffer(b"".join(columns[name]), dtype=np.uint8).reshape(len(first), -1)
                       for name in ("first_details", "second_details")]
            same = near_duplicates.confirmed(*details, np.where(second >= first_reference, eval_overlap_fine_bits,
                                                                near_duplicates.FINE_BITS_APART))
            yield pa.RecordBatch.from_pydict({"first": first[same], "second": second[same],
                                              "distance": np.asarray(columns["distance"], dtype=np.int32)[same]})
    return confirm


def screen_near_duplicates(session, survivors, total, exclusion_sets, duplicates):
    """Screened (candidate indices) of the exact-duplicate survivors against the evaluation images and each other;
    `total`: the number of candidates (the evaluation images are numbered from it)."""
    if not (duplicates.near_duplicate_bits >= 0 or exclusion_sets):
        return Screened.nothing()
    references = [(total + number, _signed(phash), bytes(details)) for number, (phash, details) in enumerate(
        (phash, details) for excluded in exclusion_sets for phash, details in zip(
            excluded.hashes.tolist(), excluded.details, strict=True))]
    hashes = survivors.select(F.col("candidate").alias("index"), "phash", "details").unionByName(
        session.createDataFrame(references, HASH_SCHEMA))
    threshold = max(duplicates.near_duplicate_bits, duplicates.eval_overlap_bits if exclusion_sets else -1)
    pairs = _near_pairs(session, hashes, total + len(references), threshold, total)
    pairs = pairs.where(F.when(F.col("second") >= total, F.col("distance") <= duplicates.eval_overlap_bits)
                        .otherwise(F.col("distance") <= duplicates.near_duplicate_bits))
    details = hashes.select("index", "details")
    with_details = pairs.join(details.withColumnsRenamed({"index": "first", "details": "first_details"}), "first").join(
        details.withColumnsRenamed({"index": "second", "details": "second_details"}), "second")
    confirmed = with_details.select("first", "second", "distance", "first_details", "second_details").mapInArrow(
        _confirm(total, duplicates.eval_overlap_fine_bits), PAIR_SCHEMA)
    second, first, distance = _arrays(confirmed, ["second", "first", "distance"])  # sorted by (second, first)
    return _decided(first, second, distance.astype(np.uint8), total, exclusion_sets)


def _decided(first, second, distance, total, exclusion_sets):
    """near_duplicates.screen on the confirmed pairs, with the candidates in them relabelled 0, 1, ... in order
    (the evaluation images after them) and the result in candidate indices again."""
    involved = np.unique(np.concatenate([first, second[second < total]]))
    count = len(involved)

    def relabelled(indices):
        return np.where(indices < total, np.searchsorted(involved, indices), indices - total + count)

    index, outcome, matched, distance = near_duplicates.screen(relabelled(first), relabelled(second), distance, count)
    matched = np.where(outcome == near_duplicates.NEAR_DUPLICATE, involved[np.clip(matched, 0, max(count - 1, 0))],
                       matched - count)
    references = [(excluded.path, name) for excluded in exclusion_sets for name in excluded.names]
    return Screened(involved[index], outcome, matched, distance, references)
