"""The whole build on Spark (`make shards DISTRIBUTOR=pyspark`): the local build's passes, each per-shard step the
same pure function as there, run as Spark tasks; the cross-set steps as DataFrame operations. Same input and
options, same result: the same samples kept, the same reasons for each dropped one, the same shards, bytes and
order, the same manifest (docs/spark.md).

1. One task per raw shard: clean_raw_shard (decode, validate, clean, hash; its work records reused when made from
   the same bytes and rules), then its candidates as rows.
2. Exact and near duplicates, evaluation overlaps (datapipe/shards/spark_screen.py).
3. The plan: the kept candidates in key order cut into runs of samples_per_shard, each run a range of candidate
   indices less the dropped ones in it, worked out on the driver from the dropped candidates alone. One task per
   training shard checks whether the shard on disk was made from exactly that (plan_shard), and one per shard
   still to write writes it and its DALI index (write_output_shard); raw shards whose work tars are gone are
   cleaned again first.
4. On the driver, as the local build: removal of files the manifest does not list, rejected.jsonl.zst, report.md,
   manifest.json last.

Every file lands in OUT as the local build writes it (atomically, done records, no manifest while shards change),
so a build killed at any point and run again gives the same shards. Spark's tasks read and write OUT and RAW by
path: on a cluster both must be on a file system every executor mounts at the same path (docs/spark.md).
"""

import contextlib
import json
import time
from pathlib import Path

import numpy as np
from pyspark import StorageLevel

from datapipe.common import manifest
from datapipe.shards import exclusions
from datapipe.shards.clean import UnlistedSamples, UnreadableShard, clean_raw_shard, unusable_shard
from datapipe.shards.pipeline import remove_other_files
from datapipe.shards.plan import PlannedShard, done_record, plan_shard, planned_shard
from datapipe.shards.results import write_results
from datapipe.shards.spark_screen import CANDIDATE_SCHEMA, candidate_rows, exact_duplicates, screen_near_duplicates
from datapipe.shards.spark_session import SparkMap, run_tasks, spark_session
from datapipe.shards.work import WORK_DIR, read_records, work_paths
from datapipe.shards.write import write_output_shard


@contextlib.contextmanager
def _step(session, name, step_times_s):
    """A step of the build: its Spark jobs grouped under `name` (Spark's UI and REST API), its time recorded."""
    session.sparkContext.setJobGroup(name, f"make shards: {name}")
    started = time.perf_counter()
    yield
    step_times_s[name] = time.perf_counter() - started


class _UnusableShard(Exception):
    """Pass 1's UnreadableShard or UnlistedSamples (args: the raw tar, the error), sent from a task to the driver."""


def _clean_and_count(raw_tar, work_dir, rules, need_samples, hashing):
    """Pass 1 for one raw tar: (its records path, its number of accepted samples)."""
    try:
        records_path = clean_raw_shard(raw_tar, work_dir, rules, need_samples, hashing)
    except (UnreadableShard, UnlistedSamples) as error:
        raise _UnusableShard(raw_tar, error) from None
    return str(records_path), sum(1 for record in read_records(records_path) if record["reason"] is None)


def _clean(session, raw_tars, work_dir, rules, need_samples, hashing):
    """Pass 1 for each raw tar, one Spark task each: [(records path, accepted samples)]."""
    try:
        return run_tasks(session, _clean_and_count, [(str(raw_tar), str(work_dir), rules, need_samples, hashing)
                                                     for raw_tar in raw_tars])
    except _UnusableShard as failure:
        raise unusable_shard(*failure.args) from None


def _plan(total, dropped, samples_per_shard):
    """[(number, first candidate, end, the dropped candidates between)] of each training shard: runs of
    `samples_per_shard` kept candidates in key order. The kept candidates are 0..total-1 less `dropped` (sorted), so
    each run is a range of candidate indices less the dropped ones in it: worked out from the dropped alone, never
    a list of every sample (_shard_candidates makes a shard's list in its task)."""
    starts = np.arange(0, total - len(dropped), samples_per_shard)  # kept positions where shards start
    kept_below = dropped - np.arange(len(dropped))  # kept candidates below each dropped one
    first = starts + np.searchsorted(kept_below, starts, side="right")  # the candidate at each start
    ends = np.append(first[1:], total)[:len(first)]
    return [(number, low, high, dropped[np.searchsorted(dropped, low):np.searchsorted(dropped, high)])
            for number, (low, high) in enumerate(zip(first.tolist(), ends.tolist(), strict=True))]


def _shard_candidates(low, high, dropped):
    """The candidate indices of a planned shard (as _plan gives it)."""
    return np.setdiff1d(np.arange(low, high), dropped)


def build_on_spark(raw_dir, out_dir, raw_tars, samples_per_shard, rules, compress, duplicates, spark_master=None,
                   step_times_s=None):
    """The passes of pipeline.build on Spark (the lock and the input checks are pipeline.build's); returns the
    manifest dict. `step_times_s`: a dict to fill with each step's seconds."""
    step_times_s = {} if step_times_s is None else step_times_s
    with spark_session(spark_master) as session:
        return _build(session, raw_dir, out_dir, raw_tars, samples_per_shard, rules, compress, duplicates,
                      step_times_s)


def _build(session, raw_dir, out_dir, raw_tars, samples_per_shard, rules, compress, duplicates, step_times_s):
    context = session.sparkContext
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _step(session, "exclude", step_times_s):  # first: an unusable EXCLUDE path stops the build before pass 1
        exclusion_sets = exclusions.load(duplicates.exclude, SparkMap(session))
    with _step(session, "validate", step_times_s):
        cleaned = _clean(session, raw_tars, work_dir, rules, need_samples=False, hashing=duplicates.hashing)
    records_paths = [records_path for records_path, _ in cleaned]
    counts = np.asarray([accepted for _, accepted in cleaned], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    stems = [Path(path).stem for path in records_paths]
    made_from = {stem: json.loads(work_paths(work_dir, stem)[2].read_text()) for stem in stems}
    with _step(session, "exact duplicates", step_times_s):
        candidates = context.parallelize(
            [(number, path, int(offsets[number])) for number, path in enumerate(records_paths)],
            max(len(records_paths), 1)).flatMap(lambda shard: candidate_rows(*shard)).toDF(CANDIDATE_SCHEMA)
        candidates = candidates.persist(StorageLevel.MEMORY_AND_DISK)
        found, survivors = exact_duplicates(candidates)
        survivors = survivors.persist(StorageLevel.MEMORY_AND_DISK)
    with _step(session, "near duplicates", step_times_s):
        screened = screen_near_duplicates(session, survivors, int(offsets[-1]), exclusion_sets, duplicates)
    with _step(session, "plan", step_times_s):
        plan_rows = _plan(int(offsets[-1]), np.union1d(found.index, screened.index), samples_per_shard)
        shared = context.broadcast((str(out_dir), records_paths, counts, made_from, compress))

        def check(number, *run):
            out_dir, records_paths, counts, made_from, compress = shared.value
            shard, written = plan_shard(out_dir, planned_shard(number, _shard_candidates(*run), counts, made_from),
                                        records_paths, counts, compress)
            return shard.name, shard.made_from, written

        plan = run_tasks(session, check, plan_rows)
    entries = {}
    to_write = {name: shard_made_from for name, shard_made_from, written in plan if not written}
    if to_write:
        (out_dir / manifest.MANIFEST).unlink(missing_ok=True)  # nothing looks complete while shards change
        with _step(session, "clean again", step_times_s):  # work tars deleted by an earlier build are made again
            needed = sorted({stem for shard_made_from in to_write.values() for stem in shard_made_from["work"]
                             if not work_paths(work_dir, stem)[0].exists()})
            _clean(session, [raw_dir / f"{stem}.tar" for stem in needed], work_dir, rules, need_samples=True,
                   hashing=duplicates.hashing)
        with _step(session, "write", step_times_s):
            writing = context.broadcast((str(out_dir), records_paths, counts, compress, str(raw_dir)))

            def write(number, shard_made_from, *run):
                out_dir, records_paths, counts, compress, raw_dir = writing.value
                shard = PlannedShard(f"{number:06d}", _shard_candidates(*run), shard_made_from)
                return shard.name, write_output_shard(out_dir, shard, records_paths, counts, compress, raw_dir)

            entries = dict(run_tasks(session, write, [(number, to_write[f"{number:06d}"], *run)
                                                      for number, *run in plan_rows if f"{number:06d}" in to_write]))
    for stem in stems:  # every planned shard is written: no work tar is read again
        work_paths(work_dir, stem)[0].unlink(missing_ok=True)
    for name, _, _ in plan:
        if name not in entries:
            entries[name] = json.loads(done_record(out_dir, name).read_text())["entry"]
    for frame in (candidates, survivors):
        frame.unpersist()
    with _step(session, "results", step_times_s):
        remove_other_files(out_dir, {name for name, _, _ in plan}, set(stems), compress)
        result = write_results(raw_dir, out_dir, made_from, records_paths, counts, found, screened, exclusion_sets,
                               [entries[name] for name, _, _ in plan], samples_per_shard, rules, duplicates, compress,
                               f"Spark {context.master} ({context.defaultParallelism} cores)", started)
    print("spark steps: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in step_times_s.items()))
    return result
