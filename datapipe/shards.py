"""`make shards`: validate, clean, filter, de-duplicate and re-shard downloaded data.

    python -m datapipe.shards build shards/demo/raw shards/demo/train
    python -m datapipe.shards verify shards/demo/train

Three passes. (1) In parallel, one raw shard per task: decode every image, normalize it to an
RGB JPEG, clean and tokenize its caption, or reject it with a reason; results go to
<out>/_work. (2) Drop exact duplicate images (same decoded pixels), keeping the first in key
order, and plan fixed-size output shards. (3) In parallel, write each training shard, its DALI
index, then manifest.json, rejected.jsonl.zst and report.md.

Re-running is safe: finished work and output shards are verified by hash and skipped; files
are written under a '.partial' name and renamed when complete.
"""

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from datapipe import manifest, shard_io, text
from datapipe.validate import ImageRules, Rejected, clean_image

WORK_DIR = "_work"
TOKENIZE_BATCH = 256  # captions tokenized per call: open_clip's per-call overhead is large
MANIFEST_VERSION = 1


# --- pass 1: one raw shard -> cleaned samples + a record per sample -------------------------

class UnreadableShard(Exception):
    """A raw tar that cannot be read to the end; carries only a message, so it crosses processes."""


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices, and jpeg


def _clean_sample(raw, url, rules):
    """(sample to store, its info, pixel digest) for one raw img2dataset sample; raises Rejected."""
    image = clean_image(next((raw[name] for name in IMAGE_MEMBERS if name in raw), b""), rules)
    original_caption = raw.get("txt", b"").decode("utf-8", errors="replace")
    caption = text.clean_caption(original_caption)
    if not caption:
        raise Rejected("empty_caption", f"caption {original_caption!r} is empty after cleaning")
    info = dict(key=raw["__key__"], url=url, caption_original=original_caption,
                width_px=image.width_px, height_px=image.height_px, converted=image.converted)
    return dict(__key__=raw["__key__"], jpg=image.jpeg, txt=caption.encode()), info, image.pixel_digest


def clean_raw_shard(raw_tar, work_dir, rules):
    """Pass 1 for one raw tar; returns the path of its record file (skipped if already done)."""
    work_dir = Path(work_dir)
    records_path = work_dir / f"{Path(raw_tar).stem}.jsonl"
    if records_path.exists():
        return records_path
    records = []

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
                    sample, info, digest = _clean_sample(raw, url, rules)
                except Rejected as rejection:
                    records.append(dict(key=key, url=url, reason=rejection.reason, detail=rejection.detail))
                    continue
                sample["json"] = json.dumps({**info, "source": Path(raw_tar).name}, ensure_ascii=False).encode()
                records.append(dict(key=key, url=url, reason=None, digest=digest))
                batch.append(sample)
                if len(batch) == TOKENIZE_BATCH:
                    yield from tokenized(batch)
                    batch = []
        except (tarfile.TarError, OSError, ValueError) as error:
            raise UnreadableShard(f"{type(error).__name__}: {error.args[0] if error.args else error}") from None
        if batch:
            yield from tokenized(batch)

    shard_io.write_tar(work_dir / f"{Path(raw_tar).stem}.tar", cleaned_samples())
    manifest.write_atomic(records_path, "".join(json.dumps(r) + "\n" for r in records))
    return records_path


# --- pass 2: de-duplicate and plan ---------------------------------------------------------

def plan_shards(records_by_raw_shard, samples_per_shard):
    """(list of output shards, each a list of (work tar stem, key)), duplicate rejections)."""
    first_key_of_digest, kept, duplicates = {}, [], []
    for raw_stem, records in records_by_raw_shard:
        for record in records:
            if record["reason"] is not None:
                continue
            original = first_key_of_digest.setdefault(record["digest"], record["key"])
            if original != record["key"]:
                duplicates.append(dict(stage="shards", key=record["key"], url=record["url"],
                                       reason="duplicate", detail=f"same pixels as {original}"))
                continue
            kept.append((raw_stem, record["key"]))
    planned = [kept[start:start + samples_per_shard] for start in range(0, len(kept), samples_per_shard)]
    return planned, duplicates


# --- pass 3: write one training shard -------------------------------------------------------

def write_output_shard(out_dir, shard_name, members, extensions, compress):
    """Write one training shard from work tars; `members` is [(work tar, key)]. Returns its entry."""
    out_dir = Path(out_dir)
    suffix = ".tar.zst" if compress else ".tar"
    tar_path = out_dir / f"{shard_name}{suffix}"
    index_path = out_dir / f"{shard_name}.idx"
    done_path = out_dir / WORK_DIR / f"{shard_name}.done.json"
    keys = [key for _, key in members]
    if tar_path.exists() and done_path.exists():
        done = json.loads(done_path.read_text())
        if (done["keys"] == keys and shard_io.sha256_file(tar_path) == done["sha256"]
                and (compress or index_path.exists())):
            return done["entry"]

    def samples():
        # A work tar's members are contiguous in the plan: open and index each tar once.
        for work_tar, run in itertools.groupby(members, key=lambda member: member[0]):
            offsets = shard_io.member_offsets(work_tar)
            with open(work_tar, "rb") as stream:
                for _, key in run:
                    sample = {"__key__": key}
                    for extension in extensions:
                        offset, size = offsets[f"{key}.{extension}"]
                        stream.seek(offset)
                        sample[extension] = stream.read(size)
                    yield sample

    shard_io.write_tar(tar_path, samples())
    entry = dict(name=tar_path.name, samples=len(keys), bytes=tar_path.stat().st_size,
                 sha256=shard_io.sha256_file(tar_path), first_key=keys[0], last_key=keys[-1])
    if not compress:
        shard_io.write_dali_index(tar_path, index_path)
        entry["index"] = index_path.name
    manifest.write_atomic(done_path, json.dumps(dict(keys=keys, sha256=entry["sha256"], entry=entry)))
    return entry


# --- the whole build ------------------------------------------------------------------------

def _download_records(raw_dir):
    """(rows in the url list, download failures) from img2dataset's per-shard parquet files."""
    rows, failures = 0, []
    for parquet in sorted(Path(raw_dir).glob("*.parquet")):
        table = pq.read_table(parquet, columns=["key", "url", "status", "error_message"]).to_pylist()
        rows += len(table)
        failures += [dict(stage="download", key=row["key"], url=row["url"], reason="download_failed",
                          detail=row["error_message"] or "") for row in table if row["status"] != "success"]
    return rows, failures


def _count_raw_samples(raw_tars):
    total = 0
    for raw_tar in raw_tars:
        stats = Path(raw_tar).with_name(Path(raw_tar).stem + "_stats.json")
        total += json.loads(stats.read_text())["successes"] if stats.exists() else 0
    return total


def build(raw_dir, out_dir, samples_per_shard=10000, processes=None, rules=ImageRules(), compress=False):
    """Build training shards from img2dataset output; returns the manifest dict."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw_tars = sorted(raw_dir.glob("*.tar"))
    if not raw_tars:
        raise SystemExit(f"error: no .tar shards in '{raw_dir}'; run `make download` first "
                         "(or point at img2dataset's webdataset output)")
    work_dir = out_dir / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    processes = processes or os.cpu_count()
    # spawn, not fork: a caller that already imported torch (its thread pools) would deadlock forked workers.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Pass 1
        futures = [pool.submit(clean_raw_shard, raw_tar, work_dir, rules) for raw_tar in raw_tars]
        with tqdm(total=_count_raw_samples(raw_tars), desc="validate", unit="img") as progress:
            records_by_raw_shard = []
            for raw_tar, future in zip(raw_tars, futures, strict=True):
                try:
                    records_path = future.result()
                except UnreadableShard as error:
                    raise SystemExit(
                        f"error: raw shard '{raw_tar}' cannot be read ({error}). "
                        f"Delete it and {raw_tar.stem}_stats.json, then run `make download` again: "
                        "img2dataset's incremental mode fetches just that shard.") from None
                records = [json.loads(line) for line in records_path.read_text().splitlines()]
                records_by_raw_shard.append((str(work_dir / f"{raw_tar.stem}.tar"), records))
                progress.update(len(records))
        # Pass 2
        planned, duplicates = plan_shards(records_by_raw_shard, samples_per_shard)
        # Pass 3
        extensions = ("jpg", "json", "tokens", "txt")
        futures = [pool.submit(write_output_shard, out_dir, f"{index:06d}", members, extensions, compress)
                   for index, members in enumerate(planned)]
        entries = [future.result() for future in tqdm(futures, desc="write", unit="shard")]
    rejections = [dict(stage="shards", key=r["key"], url=r["url"], reason=r["reason"], detail=r["detail"])
                  for _, records in records_by_raw_shard for r in records if r["reason"] is not None]
    rejections += duplicates
    url_list_rows, download_failures = _download_records(raw_dir)
    in_raw = sum(len(records) for _, records in records_by_raw_shard)
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
               "context_length": text.CONTEXT_LENGTH},
        shards=entries,
        totals=dict(shards=len(entries), samples=kept, bytes=sum(e["bytes"] for e in entries)),
        reconciliation=manifest.reconciliation(url_list_rows, download_failures, in_raw, kept, rejections),
    )
    manifest.write_rejected(out_dir / manifest.REJECTED, download_failures + rejections)
    manifest.write_atomic(out_dir / manifest.MANIFEST, json.dumps(result, indent=2, ensure_ascii=False))
    examples = {}
    for rejection in download_failures + rejections:
        examples.setdefault((rejection["stage"], rejection["reason"]), rejection)
    manifest.write_report(out_dir / manifest.REPORT, result, examples)
    elapsed_s = time.perf_counter() - started
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
    if not (counts["download_balanced"] and counts["shards_balanced"]):
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
    verify_parser = commands.add_parser("verify", help="re-check hashes, counts and indexes")
    verify_parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command == "build":
        rules = ImageRules(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ImageRules)})
        build(args.raw_dir, args.out_dir, args.samples_per_shard, args.processes, rules, args.compress)
    else:
        problems = verify(args.out_dir)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            raise SystemExit(f"verify failed: {len(problems)} problem(s) in {args.out_dir}")
        print(f"verify ok: every shard in {args.out_dir} matches its manifest and DALI index")


if __name__ == "__main__":
    main()
