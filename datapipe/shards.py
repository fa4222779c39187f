"""`make shards`: validate, clean, filter, de-duplicate and re-shard downloaded data.

    python -m datapipe.shards build shards/demo/raw shards/demo/train
    python -m datapipe.shards verify shards/demo/train

Three passes. (1) In parallel, one raw shard per task: decode every image, normalize it to an
RGB JPEG, clean and tokenize its caption, or reject it with a reason; the cleaned samples go to
<out>/_work/<raw>.tar (captions, tokens, info, and only the images that had to be converted: an
RGB JPEG is read again from the raw tar when its shard is written) and one record per sample
(sorted by key) to <out>/_work/<raw>.jsonl.
(2) Drop exact duplicate images (same decoded pixels), then images within `eval_overlap_bits` of an
evaluation image (EXCLUDE), then near duplicates (perceptual hashes within `near_duplicate_bits`),
keeping the first in key order (datapipe/near_duplicates.py), and plan fixed-size output shards.
(3) In parallel, write each training shard and its DALI index; a work tar is deleted as soon as
every shard that reads it is written. Then manifest.json, rejected.jsonl.zst
and report.md.

Never stale: each raw shard's work records what it was made from (the raw tar's sha256 and the
rules); work made from other bytes or rules is redone, and a training shard is rewritten unless
it was made from the same work, keys and settings. Files the new manifest does not list (shards of
an earlier build with another SAMPLES_PER_SHARD, work of raw shards that are gone) are removed.
While anything is rewritten there is no manifest.json, so nothing half-built looks complete.

Bounded: disk holds raw/, the training shards and the small work tars (converted images and text)
at any time, and only the per-sample records remain in _work/ afterwards; memory holds one 40-byte entry per sample
for de-duplication, never the records themselves. One build at a time per output folder (a lock).
"""

import argparse
import dataclasses
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from datapipe import exclusions, manifest, near_duplicates, shard_io, text
from datapipe.download import URL_LIST_RECORD, URL_LIST_REJECTED
from datapipe.folder_lock import FolderBusy, FolderLock
from datapipe.validate import ImageRules, Rejected, clean_image

WORK_DIR = "_work"
TOKENIZE_BATCH = 256  # captions tokenized per call: open_clip's per-call overhead is large
MANIFEST_VERSION = 2
WORK_VERSION = 2  # raise when pass 1 gives other output for the same input
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices, and jpeg
EXTENSIONS = ("jpg", "json", "tokens", "txt")  # what a training sample holds
MAX_HASH_BITS_APART = 10


class BuildError(SystemExit):
    """A build that cannot go on; the message says why and what to do."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


@dataclasses.dataclass(frozen=True)
class DuplicateRules:
    """Pass 2's screening beyond exact duplicates; every one is a command-line option."""

    near_duplicate_bits: int = 8  # pHash bits apart that still count as the same picture; -1 keeps near duplicates
    eval_overlap_bits: int = 8  # the same, against the EXCLUDE images
    exclude: tuple[str, ...] = ()  # folders, images or .tar shards of evaluation images

    def __post_init__(self):
        # Unrelated photos are rarely under 12 bits apart; the exact search's tables multiply with the bits (for
        # 12M images: 84 at 6 bits, 495 at 8, 3003 at 10).
        limit = MAX_HASH_BITS_APART
        if not (-1 <= self.near_duplicate_bits <= limit and 0 <= self.eval_overlap_bits <= limit):
            raise ValueError(f"--near-duplicate-bits must be -1 (off) to {MAX_HASH_BITS_APART} and "
                             f"--eval-overlap-bits 0 to {MAX_HASH_BITS_APART} (got {self.near_duplicate_bits} and "
                             f"{self.eval_overlap_bits})")

    @property
    def hashing(self):
        """Whether pass 1 computes perceptual hashes (off only when nothing reads them)."""
        return self.near_duplicate_bits >= 0 or bool(self.exclude)

    def describe(self):
        confirmation = (f"confirmed by a 256-bit pHash within {near_duplicates.FINE_BITS_APART} bits and colour layout "
                        f"within {near_duplicates.COLOUR_TOLERANCE}")
        near = (f"perceptual hash (64-bit pHash) within {self.near_duplicate_bits} bits {confirmation} of an earlier "
                "kept sample; the first in key order is kept") if self.near_duplicate_bits >= 0 else "kept"
        overlap = (f"perceptual hash within {self.eval_overlap_bits} bits {confirmation} of an image in "
                   f"{list(self.exclude)}" if self.exclude else "no EXCLUDE given")
        return {"near_duplicates": near, "eval_overlap": overlap}


def rules_fingerprint(rules, hashing):
    """What pass 1's output depends on besides the raw bytes."""
    settings = {**dataclasses.asdict(rules), "context_length": text.CONTEXT_LENGTH, "work_version": WORK_VERSION,
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


# --- pass 1: one raw shard -> cleaned samples + a record per sample -------------------------

class UnreadableShard(Exception):
    """A raw tar that cannot be read to the end; carries only a message, so it crosses processes."""


def _clean_sample(raw, url, rules, hashing):
    """(sample to store, its info, the cleaned image, the raw member holding the image when it is stored as it
    came, else None) for one raw img2dataset sample; raises Rejected."""
    member = next((name for name in IMAGE_MEMBERS if name in raw), None)
    image = clean_image(raw[member] if member else b"", rules, hashing)
    original_caption = raw.get("txt", b"").decode("utf-8", errors="replace")
    caption = text.clean_caption(original_caption)
    if not caption:
        raise Rejected("empty_caption", f"caption {original_caption!r} is empty after cleaning")
    info = dict(key=raw["__key__"], url=url, caption_original=original_caption,
                width_px=image.width_px, height_px=image.height_px, converted=image.converted)
    stored_as_is = f"{raw['__key__']}.{member}" if not image.converted else None
    return dict(__key__=raw["__key__"], jpg=image.jpeg, txt=caption.encode()), info, image, stored_as_is


def clean_raw_shard(raw_tar, work_dir, rules, need_samples=True, hashing=True):
    """Pass 1 for one raw tar; returns its records path. Earlier work is reused only when it was made from
    the same bytes under the same rules (and, with `need_samples`, its cleaned samples are still there).
    `hashing`: give each record the image's perceptual hash."""
    samples_path, records_path, made_from_path = work_paths(work_dir, Path(raw_tar).stem)
    made_from = {"raw": raw_fingerprint(raw_tar), "rules": rules_fingerprint(rules, hashing)}
    if (made_from_path.exists() and json.loads(made_from_path.read_text()) == made_from and records_path.exists()
            and (samples_path.exists() or not need_samples)):
        return records_path
    made_from_path.unlink(missing_ok=True)  # until the new work is complete
    records = []
    try:  # where each member's bytes are: images stored as they came are read from raw/ again in pass 3
        raw_members = shard_io.member_offsets(raw_tar)
    except (tarfile.TarError, EOFError) as error:
        raise UnreadableShard(f"{type(error).__name__}: {error}") from None

    def tokenized(batch):
        for sample, tokens in zip(batch, text.tokenize([s["txt"].decode() for s in batch]), strict=True):
            sample["tokens"] = text.tokens_to_bytes(tokens)
            yield sample

    def cleaned_samples():  # streams, holding at most TOKENIZE_BATCH samples
        batch = []
        try:
            for raw in shard_io.read_samples([raw_tar]):
                key = raw["__key__"]
                url = json.loads(raw.get("json", b"{}") or b"{}").get("url", "")
                try:
                    sample, info, image, stored_as_is = _clean_sample(raw, url, rules, hashing)
                except Rejected as rejection:
                    records.append(dict(key=key, url=url, reason=rejection.reason, detail=rejection.detail))
                    continue
                sample["json"] = json.dumps({**info, "source": Path(raw_tar).name}, ensure_ascii=False).encode()
                record = dict(key=key, url=url, reason=None, digest=image.pixel_digest)
                if hashing:
                    phash, details = image.signature
                    record.update(phash=f"{phash:016x}", details=details.hex())
                if stored_as_is:  # no second copy: pass 3 reads these bytes from the raw tar
                    del sample["jpg"]
                    record["jpg_in_raw"] = raw_members[stored_as_is]
                records.append(record)
                batch.append(sample)
                if len(batch) == TOKENIZE_BATCH:
                    yield from tokenized(batch)
                    batch = []
        except (tarfile.TarError, ValueError) as error:
            raise UnreadableShard(f"{type(error).__name__}: {error.args[0] if error.args else error}") from None
        if batch:
            yield from tokenized(batch)

    shard_io.write_tar(samples_path, cleaned_samples())
    records.sort(key=lambda record: record["key"])  # tar order is download-completion order; keys are list order
    manifest.write_atomic(records_path, "".join(json.dumps(r) + "\n" for r in records))
    manifest.write_atomic(made_from_path, json.dumps(made_from))
    return records_path


# --- pass 2: de-duplicate and plan ---------------------------------------------------------

def find_duplicates(records_paths, hashing):
    """Exact duplicates among the accepted samples ("candidates"), in order: raw shards in name order, keys in
    order within each. Returns (candidates per raw shard, first (n,) int64: the candidate each one duplicates,
    itself for the first of its pixels, and with `hashing` their perceptual hashes (n,) uint64, else None).
    32 bytes per candidate, plus the sort's temporaries."""
    counts, digests, hashes = [], bytearray(), bytearray()
    for records_path in records_paths:
        before = len(digests)
        for record in read_records(records_path):
            if record["reason"] is None:
                digests += bytes.fromhex(record["digest"])[:16]  # 128 bits of sha256
                if hashing:
                    hashes += bytes.fromhex(record["phash"])
        counts.append((len(digests) - before) // 16)
    digests = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests stay in candidate order
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (digests[order[1:]] != digests[order[:-1]]).any(axis=1)
    del digests
    group = np.cumsum(starts) - 1  # the group (distinct digest) of each sorted position
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)][group]
    return (np.asarray(counts, dtype=np.int64), first,
            np.frombuffer(hashes, dtype=">u8").astype(np.uint64) if hashing else None)


@dataclasses.dataclass(frozen=True)
class Screened:
    """Candidates dropped after the exact duplicates: as eval_overlap or near_duplicate (sorted by index)."""

    index: np.ndarray  # candidate indices
    outcome: np.ndarray  # near_duplicates.EVAL_OVERLAP or NEAR_DUPLICATE
    matched: np.ndarray  # the candidate it looks like, or the evaluation image (index into `references`)
    distance: np.ndarray  # perceptual hash bits apart
    references: list  # (EXCLUDE path, image name) of each evaluation image

    @classmethod
    def nothing(cls):
        return cls(*(np.empty(0, dtype=np.int64) for _ in range(4)), [])


def screen_near_duplicates(pool, work_dir, records_paths, counts, hashes, candidates, exclusion_sets, duplicates):
    """Screen the exact-duplicate survivors `candidates` (sorted indices) against the evaluation images and each
    other (datapipe/near_duplicates.py); returns a Screened with candidate indices."""
    if not (duplicates.near_duplicate_bits >= 0 or exclusion_sets) or not len(candidates):
        return Screened.nothing()
    count = len(candidates)
    combined = np.concatenate([hashes[candidates], *(excluded.hashes for excluded in exclusion_sets)])
    threshold = max(duplicates.near_duplicate_bits, duplicates.eval_overlap_bits if exclusion_sets else -1)
    first, second, distances = near_duplicates.near_pairs(combined, threshold, count, pool,
                                                          Path(work_dir) / "perceptual_hashes.npy")
    to_reference = second >= count
    close = np.where(to_reference, distances <= duplicates.eval_overlap_bits,
                     distances <= duplicates.near_duplicate_bits)
    first, second, distances = first[close], second[close], distances[close]
    # Each pair confirmed by the details of its images, read for these images only (the candidates' from records).
    involved = np.unique(np.concatenate([first, second[second < count]]))
    details = np.zeros((len(involved) + len(combined) - count, near_duplicates.DETAIL_BYTES), dtype=np.uint8)
    for _, index, record in accepted_records(records_paths, counts, candidates[involved]):
        details[np.searchsorted(involved, np.searchsorted(candidates, index))] = np.frombuffer(
            bytes.fromhex(record["details"]), dtype=np.uint8)
    if exclusion_sets:
        details[len(involved):] = np.concatenate([excluded.details for excluded in exclusion_sets])

    def row(indices):  # a combined index -> its row of `details`
        return np.where(indices < count, np.searchsorted(involved, indices), indices - count + len(involved))

    same = near_duplicates.confirmed(details[row(first)], details[row(second)])
    index, outcome, matched, distance = near_duplicates.screen(first[same], second[same], distances[same], count)
    matched = np.where(outcome == near_duplicates.NEAR_DUPLICATE, candidates[np.clip(matched, 0, count - 1)],
                       matched - count)
    references = [(excluded.path, name) for excluded in exclusion_sets for name in excluded.names]
    return Screened(candidates[index], outcome, matched, distance, references)


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


# --- pass 3: write one training shard -------------------------------------------------------

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
        entry["index"] = tar_path.with_suffix(".idx").name
    manifest.write_atomic(done_record(out_dir, shard.name), json.dumps(dict(made_from=shard.made_from, entry=entry)))
    return entry


# --- the whole build ------------------------------------------------------------------------

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


def _shards_rejections(records_paths, counts, first, screened):
    """Each sample make shards dropped (with its reason), streamed: records in order, then the exact duplicates,
    then the evaluation overlaps and near duplicates."""
    for records_path in records_paths:
        for record in read_records(records_path):
            if record["reason"] is not None:
                yield dict(stage="shards", key=record["key"], url=record["url"], reason=record["reason"],
                           detail=record["detail"])
    candidates = np.arange(len(first))
    looks_like = screened.matched[screened.outcome == near_duplicates.NEAR_DUPLICATE]
    dropped_rows = candidate_keys(records_paths, counts, np.union1d(candidates[first != candidates], screened.index))
    originals = candidate_keys(records_paths, counts, np.union1d(first[first != candidates], looks_like))
    for index in np.flatnonzero(first != candidates).tolist():
        key, url = dropped_rows[index]
        original = originals[int(first[index])][0]
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


def _check_raw_shards(raw_dir, raw_tars):
    if not raw_tars:
        raise BuildError(f"no .tar shards in '{raw_dir}'; run `make download` first "
                         "(or point RAW at img2dataset's webdataset output)")
    for raw_tar in raw_tars:
        expected = (raw_tar.with_name(f"{raw_tar.stem}_stats.json"), raw_tar.with_suffix(".parquet"))
        missing = [path.name for path in expected if not path.exists()]
        if missing:
            raise BuildError(f"raw shard '{raw_tar}' has no {' or '.join(missing)}: img2dataset did not finish it (a "
                             f"download stopped while writing it). Delete {raw_tar.name} and run `make download` "
                             "again: its incremental mode fetches just that shard.")


def _disk_full(error, folder, needed_bytes):
    free = shutil.disk_usage(folder).free
    return BuildError(f"the disk holding '{folder}' is full ({error.filename or error}). This build needs about "
                      f"{needed_bytes / 2**30:.1f} GiB free there ({free / 2**30:.1f} GiB is). Free space and run "
                      "`make shards` again: finished work is kept and nothing half-written looks complete.")


def _remove_other_files(out_dir, shard_names, raw_stems, compress):
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


def build(raw_dir, out_dir, samples_per_shard=10000, processes=None, rules=ImageRules(), compress=False,
          duplicates=DuplicateRules()):
    """Build training shards from img2dataset output; returns the manifest dict."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw_tars = sorted(raw_dir.glob("*.tar"))
    _check_raw_shards(raw_dir, raw_tars)
    try:
        lock = FolderLock(out_dir, "another `make shards`", "wait for it to end, or build into another OUT")
    except FolderBusy as error:
        raise BuildError(str(error)) from None
    try:
        return _build(raw_dir, out_dir, raw_tars, samples_per_shard, processes or os.cpu_count(), rules, compress,
                      duplicates)
    except exclusions.ExclusionError as error:
        raise BuildError(str(error)) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(error, out_dir, sum(raw_tar.stat().st_size for raw_tar in raw_tars)) from None
    finally:
        lock.release()


def _build(raw_dir, out_dir, raw_tars, samples_per_shard, processes, rules, compress, duplicates):
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # spawn, not fork: a caller that already imported torch (its thread pools) would deadlock forked workers.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Pass 1: the records of every raw shard (its cleaned samples are made again later if a shard needs them).
        records_paths = _pass_1(pool, raw_tars, work_dir, rules, need_samples=False, hashing=duplicates.hashing)
        # Pass 2: exact duplicates, evaluation overlaps and near duplicates, then the plan: fixed-size runs of the
        # kept candidates.
        counts, first, hashes = find_duplicates(records_paths, duplicates.hashing)
        kept = np.flatnonzero(first == np.arange(len(first)))
        exclusion_sets = exclusions.load(duplicates.exclude, pool)
        screened = screen_near_duplicates(pool, work_dir, records_paths, counts, hashes, kept, exclusion_sets,
                                          duplicates)
        del hashes
        kept = np.setdiff1d(kept, screened.index, assume_unique=True)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        stems = [Path(path).stem for path in records_paths]
        made_from = {stem: json.loads(work_paths(work_dir, stem)[2].read_text()) for stem in stems}
        plan = []
        for number, start in enumerate(range(0, len(kept), samples_per_shard)):
            candidates = kept[start:start + samples_per_shard]
            reads = np.unique(np.searchsorted(offsets, candidates, side="right") - 1)
            plan.append(PlannedShard(f"{number:06d}", candidates,
                                     {"work": {stems[index]: made_from[stems[index]] for index in reads}}))
        futures = [pool.submit(plan_shard, out_dir, shard, records_paths, counts, compress) for shard in plan]
        planned = [future.result() for future in tqdm(futures, desc="check", unit="shard", leave=False)]
        plan = [shard for shard, _ in planned]
        to_write = [shard for shard, written in planned if not written]
        entries = {}
        if to_write:
            (out_dir / manifest.MANIFEST).unlink(missing_ok=True)  # nothing looks complete while shards change
            # Work tars deleted by an earlier build are made again; the rest was checked in pass 1 just now.
            needed = sorted({stem for shard in to_write for stem in shard.made_from["work"]
                             if not work_paths(work_dir, stem)[0].exists()})
            _pass_1(pool, [raw_dir / f"{stem}.tar" for stem in needed], work_dir, rules, need_samples=True,
                    hashing=duplicates.hashing)
            entries = _pass_3(pool, out_dir, to_write, records_paths, counts, compress, raw_dir)
        for shard in plan:
            if shard.name not in entries:
                entries[shard.name] = json.loads(done_record(out_dir, shard.name).read_text())["entry"]
    _remove_other_files(out_dir, {shard.name for shard in plan}, set(stems), compress)
    return _write_results(raw_dir, out_dir, made_from, records_paths, counts, first, screened, exclusion_sets,
                          [entries[shard.name] for shard in plan], samples_per_shard, rules, duplicates, compress,
                          processes, started)


def _pass_1(pool, raw_tars, work_dir, rules, need_samples, hashing):
    futures = [pool.submit(clean_raw_shard, raw_tar, work_dir, rules, need_samples, hashing) for raw_tar in raw_tars]
    total = sum(json.loads(raw_tar.with_name(f"{raw_tar.stem}_stats.json").read_text()).get("successes", 0)
                for raw_tar in raw_tars)
    records_paths = []
    with tqdm(total=total, desc="validate" if not need_samples else "clean again", unit="img") as progress:
        for raw_tar, future in zip(raw_tars, futures, strict=True):
            try:
                records_paths.append(future.result())
            except UnreadableShard as error:
                raise BuildError(
                    f"raw shard '{raw_tar}' cannot be read ({error}). Delete it and {raw_tar.stem}_stats.json, then "
                    "run `make download` again: img2dataset's incremental mode fetches just that shard.") from None
            progress.update(sum(1 for _ in open(records_paths[-1])))  # noqa: SIM115 (closed when read)
    return records_paths


def _pass_3(pool, out_dir, to_write, records_paths, counts, compress, raw_dir):
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


def _write_results(raw_dir, out_dir, made_from, records_paths, counts, first, screened, exclusion_sets, entries,
                   samples_per_shard, rules, duplicates, compress, processes, started):
    tally, examples = {"url_list": Counter(), "download": Counter(), "shards": Counter()}, {}

    def counted(rejections):
        for rejection in rejections:
            tally[rejection["stage"]][rejection["reason"]] += 1
            examples.setdefault((rejection["stage"], rejection["reason"]), rejection)
            yield rejection

    manifest.write_rejected(out_dir / manifest.REJECTED, counted(itertools.chain(
        _url_list_rejections(raw_dir), _download_failures(raw_dir),
        _shards_rejections(records_paths, counts, first, screened))))
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
               "context_length": text.CONTEXT_LENGTH},
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
          f"{in_raw / elapsed_s:.0f} samples/s on {processes} processes; see {out_dir / manifest.REPORT}")
    return result


def verify(out_dir):
    """Re-check every shard against the manifest: hash, size, sample count, DALI index. Returns problems."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / manifest.MANIFEST
    if not manifest_path.exists():
        return [f"{manifest_path} is missing; run `make shards` first"]
    recorded = json.loads(manifest_path.read_text())
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
            problems += _verify_index(tar_path, out_dir / entry["index"], keys)
    counts = recorded["reconciliation"]
    if not (counts["download_balanced"] and counts["shards_balanced"] and counts.get("url_list_balanced", True)):
        problems.append(f"{manifest_path}: the counts do not reconcile: {counts}")
    if sum(entry["samples"] for entry in recorded["shards"]) != recorded["totals"]["samples"]:
        problems.append(f"{manifest_path}: shard sample counts do not add up to totals.samples")
    return problems


def _verify_index(tar_path, index_path, keys):
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
    return []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="raw img2dataset shards -> training shards")
    build_parser.add_argument("raw_dir")
    build_parser.add_argument("out_dir")
    build_parser.add_argument("--samples-per-shard", type=int, default=10000)
    build_parser.add_argument("--processes", type=int, default=os.cpu_count())
    build_parser.add_argument("--compress", action="store_true",
                              help="write .tar.zst (smaller; torch loader only, no DALI index)")
    for field in dataclasses.fields(ImageRules):
        build_parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                                  default=field.default, help=f"default {field.default}")
    defaults = DuplicateRules()
    build_parser.add_argument("--near-duplicate-bits", type=int, default=defaults.near_duplicate_bits,
                              help="drop images whose perceptual hash is within this many of 64 bits of an earlier "
                                   f"kept image; -1 keeps near duplicates (default {defaults.near_duplicate_bits})")
    build_parser.add_argument("--eval-overlap-bits", type=int, default=defaults.eval_overlap_bits,
                              help="the same against the --exclude images (default "
                                   f"{defaults.eval_overlap_bits})")
    build_parser.add_argument("--exclude", default="",
                              help="evaluation images training must not contain: folders, images or .tar shards, "
                                   "separated by ':' (make shards EXCLUDE=...)")
    verify_parser = commands.add_parser("verify", help="re-check hashes, counts and indexes")
    verify_parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command == "build":
        rules = ImageRules(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ImageRules)})
        try:
            duplicates = DuplicateRules(args.near_duplicate_bits, args.eval_overlap_bits,
                                        tuple(path for path in args.exclude.split(os.pathsep) if path))
        except ValueError as error:
            raise BuildError(str(error)) from None
        build(args.raw_dir, args.out_dir, args.samples_per_shard, args.processes, rules, args.compress, duplicates)
    else:
        problems = verify(args.out_dir)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            raise SystemExit(f"verify failed: {len(problems)} problem(s) in {args.out_dir}")
        print(f"verify ok: every shard in {args.out_dir} matches its manifest and DALI index")


if __name__ == "__main__":
    main()
