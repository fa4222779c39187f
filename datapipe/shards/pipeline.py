"""The whole build: one lock on the output folder, the three passes in order on one process pool (or on Spark:
datapipe/shards/spark_pipeline.py), removal of what the new manifest does not list, then the results; a full disk
stops it with the space needed."""

import errno
import functools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from datapipe.common import manifest
from datapipe.common.byte_sizes import readable_bytes
from datapipe.common.folder_lock import FolderBusy, FolderLock
from datapipe.common.process_pool import ProcessPool
from datapipe.common.validate import ImageRules
from datapipe.shards import exclusions, spark_session
from datapipe.shards.clean import clean_raw_shards
from datapipe.shards.duplicates import ExactDuplicates, find_duplicates
from datapipe.shards.inputs import BuildError, check_raw_shards, check_settings
from datapipe.shards.plan import done_record, plan_shards
from datapipe.shards.results import write_results
from datapipe.shards.screen import DuplicateRules, screen_near_duplicates
from datapipe.shards.work import WORK_DIR, work_paths
from datapipe.shards.write import write_shards


def _disk_full(error, folder, needed_bytes):
    free = shutil.disk_usage(folder).free
    return BuildError(f"the disk holding '{folder}' is full ({error.filename or error}). This build needs about "
                      f"{readable_bytes(needed_bytes)} free there ({readable_bytes(free)} is). Free space and run "
                      "`make shards` again: finished work is kept and nothing half-written looks complete.")


def _not_writable(error, out_dir):
    return BuildError(f"cannot write to OUT '{out_dir}' ({error.strerror}: '{error.filename}'): make the folder "
                      "writable (chmod u+w, or remount it read-write) or build into another OUT")


def _is_not_writable(error, out_dir):
    """Whether an OSError is a refused write in the output folder (or a folder above it, while making it)."""
    if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or error.filename is None:
        return False
    failed = Path(error.filename).absolute()
    target = out_dir.absolute()
    return failed == target or target in failed.parents or failed in target.parents


def remove_other_files(out_dir, shard_names, raw_stems, compress):
    """Delete what this build's manifest does not list: shards of other builds, work of raw shards now gone."""
    keep = {f"{name}{'.tar.zst' if compress else '.tar'}" for name in shard_names}
    keep |= set() if compress else {f"{name}.idx" for name in shard_names}
    for path in out_dir.iterdir():
        if path.is_file() and path.name.endswith((".tar", ".tar.zst", ".idx", ".partial")) and path.name not in keep:
            path.unlink()
    for path in (out_dir / WORK_DIR).iterdir():
        stem = path.name.split(".")[0]
        if path.name.endswith(".partial") or (stem not in shard_names and stem not in raw_stems):
            path.unlink()


DISTRIBUTORS = ("multiprocessing", "pyspark")


def _passes(distributor, processes, spark_master):
    """The function that runs the passes on `distributor`, once what it needs is checked to be installed."""
    if distributor == "multiprocessing":
        return functools.partial(_build, processes=processes)
    if distributor != "pyspark":
        raise BuildError(f"--distributor (DISTRIBUTOR) must be one of {', '.join(DISTRIBUTORS)} (got {distributor!r})")
    spark_session.check_requirements()
    from datapipe.shards.spark_pipeline import build_on_spark  # imports pyspark, which is optional

    return functools.partial(build_on_spark, spark_master=spark_master)


def build(raw_dir, out_dir, samples_per_shard=10000, processes=None, rules=ImageRules(), compress=False,
          duplicates=DuplicateRules(), distributor="multiprocessing", spark_master=None):
    """Build training shards from img2dataset output; returns the manifest dict. `distributor`: multiprocessing
    (`processes` on this machine) or pyspark (on the Spark master `spark_master`, datapipe/shards/spark_pipeline.py;
    the same result)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw_tars = sorted(raw_dir.glob("*.tar"))
    check_raw_shards(raw_dir, raw_tars)
    processes = os.cpu_count() if processes is None else processes
    check_settings(out_dir, samples_per_shard, processes)
    passes = _passes(distributor, processes, spark_master)
    try:
        lock = FolderLock(out_dir, "another `make shards`", "wait for it to end, or build into another OUT")
    except FolderBusy as error:
        raise BuildError(str(error)) from None
    except OSError as error:
        if not _is_not_writable(error, out_dir):
            raise
        raise _not_writable(error, out_dir) from None
    try:
        return passes(raw_dir, out_dir, raw_tars, samples_per_shard, rules, compress, duplicates)
    except exclusions.ExclusionError as error:
        raise BuildError(str(error)) from None
    except OSError as error:
        if _is_not_writable(error, out_dir):
            raise _not_writable(error, out_dir) from None
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(error, out_dir, sum(raw_tar.stat().st_size for raw_tar in raw_tars)) from None
    finally:
        lock.release()


def _build(raw_dir, out_dir, raw_tars, samples_per_shard, rules, compress, duplicates, processes):
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPool(processes) as pool:
        # The evaluation images first: an unusable EXCLUDE path stops the build before hours of pass 1.
        exclusion_sets = exclusions.load(duplicates.exclude, pool)
        # Pass 1: the records of every raw shard (its cleaned samples are made again later if a shard needs them).
        records_paths = clean_raw_shards(pool, raw_tars, work_dir, rules, need_samples=False,
                                         hashing=duplicates.hashing)
        # Pass 2: exact duplicates, evaluation overlaps and near duplicates, then the plan: fixed-size runs of the
        # kept candidates.
        counts, first, hashes = find_duplicates(records_paths, duplicates.hashing)
        kept = np.flatnonzero(first == np.arange(len(first)))
        screened = screen_near_duplicates(pool, work_dir, records_paths, counts, hashes, kept, exclusion_sets,
                                          duplicates)
        del hashes
        kept = np.setdiff1d(kept, screened.index, assume_unique=True)
        stems = [Path(path).stem for path in records_paths]
        made_from = {stem: json.loads(work_paths(work_dir, stem)[2].read_text()) for stem in stems}
        plan, to_write = plan_shards(pool, out_dir, kept, records_paths, counts, made_from, samples_per_shard,
                                     compress)
        entries = {}
        if to_write:
            (out_dir / manifest.MANIFEST).unlink(missing_ok=True)  # nothing looks complete while shards change
            # Work tars deleted by an earlier build are made again; the rest was checked in pass 1 just now.
            needed = sorted({stem for shard in to_write for stem in shard.made_from["work"]
                             if not work_paths(work_dir, stem)[0].exists()})
            clean_raw_shards(pool, [raw_dir / f"{stem}.tar" for stem in needed], work_dir, rules, need_samples=True,
                             hashing=duplicates.hashing)
            entries = write_shards(pool, out_dir, to_write, records_paths, counts, compress, raw_dir)
        for shard in plan:
            if shard.name not in entries:
                entries[shard.name] = json.loads(done_record(out_dir, shard.name).read_text())["entry"]
    remove_other_files(out_dir, {shard.name for shard in plan}, set(stems), compress)
    return write_results(raw_dir, out_dir, made_from, records_paths, counts, ExactDuplicates.from_first(first),
                         screened, exclusion_sets, [entries[shard.name] for shard in plan], samples_per_shard, rules,
                         duplicates, compress, f"{processes} processes", started)
